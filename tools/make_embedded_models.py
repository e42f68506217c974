"""Make the small Phi-architecture models that ship inside phibuild (``phibuild/embedded/``).

Each model copies one Phi family's shape at a tiny size: its tokenizer kind, rope scaling, attention
layout and embedding tying, with hidden and intermediate sizes that are multiples of 256 so that
llama.cpp k-quants apply. Each is trained briefly on ``tools/corpus.txt`` so that its predictions are
far from uniform and quantization error is measurable.

The multimodal look-alike (``phi4-multimodal-tiny``, transformers' native ``Phi4MultimodalForCausalLM``) takes
phi4-mini-tiny's tokenizer and trained decoder, adds Phi-4-multimodal's image and audio tokens and tiny,
untrained (seeded) vision and audio encoders, and ships transformers' own processor with its real settings
(448-pixel crops, up to 36 of them, 14-pixel patches). ``phibuild/eval/image.png``, the image its checks
show it, is drawn here too.

Deterministic: fixed seeds, one thread, no shuffling by wall clock. Run from the repository root:

    python tools/make_embedded_models.py            # all models
    python tools/make_embedded_models.py phi3-tiny  # one model
    python tools/make_embedded_models.py image      # the image the multimodal checks show

Needs torch, torchvision, transformers, tokenizers, sentencepiece and pillow (``pip install -e ".[onnx]"`` has
them).
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    Phi3Config,
    Phi3ForCausalLM,
    Phi4MultimodalConfig,
    Phi4MultimodalFeatureExtractor,
    Phi4MultimodalForCausalLM,
    Phi4MultimodalImageProcessor,
    Phi4MultimodalProcessor,
    PreTrainedTokenizerBase,
)

from phibuild.backends.gguf.convert import O200K

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tools" / "corpus.txt"
OUT = ROOT / "phibuild" / "embedded"
IMAGE = ROOT / "phibuild" / "eval" / "image.png"

# Phi-3 / 3.5: Llama SentencePiece pieces, then these added tokens from id len(pieces) on.
PHI3_ADDED = [
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-4-mini: byte-level BPE with the o200k (gpt-4o) pre-tokenizer; <|endoftext|> closes the merges,
# the chat tokens follow it.
PHI4_ADDED = [
    "<|endofprompt|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>",
    "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>",
]
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    """One embedded model: the Phi family it imitates and its tiny dimensions."""

    name: str
    imitates: str
    tokenizer: str  # "spm" (Phi-3/3.5) or "bpe" (Phi-4 family)
    heads: int
    kv_heads: int
    longrope: bool
    partial_rotary: float = 1.0
    tied: bool = False
    sliding_window: int | None = None
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    # Embedding rows; the tokenizer has fewer entries, as in the real models (32064 rows, 32011 tokens).
    # Not 1024: the ONNX Runtime GenAI builder takes any Linear with vocab_size outputs for the LM head,
    # and gate_up_proj has 2 * intermediate = 1024.
    vocab: int = 1088
    pieces: int = 960  # tokens learned from the corpus
    seed: int = 0


SHAPES = [
    Shape("phi3-tiny", "microsoft/Phi-3-mini-4k-instruct", "spm", heads=4, kv_heads=4, longrope=False,
          sliding_window=2047, seed=3),
    Shape("phi35-tiny", "microsoft/Phi-3.5-mini-instruct", "spm", heads=4, kv_heads=4, longrope=True,
          sliding_window=262144, seed=35),
    Shape("phi4-mini-tiny", "microsoft/Phi-4-mini-instruct", "bpe", heads=4, kv_heads=2, longrope=True,
          partial_rotary=0.75, tied=True, sliding_window=262144, seed=4),
]


def corpus_lines() -> list[str]:
    """The corpus without its chat markers, one non-empty line each, for tokenizer training."""
    plain = re.sub(r"<\|[a-z_/]+\|>", "", CORPUS.read_text())
    return [line for line in plain.split("\n") if line.strip()]


def make_spm_tokenizer(shape: Shape, out: Path) -> None:
    """A Llama-style SentencePiece BPE (byte fallback, dummy prefix) plus Phi-3's added tokens."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=model, model_type="bpe",
        vocab_size=shape.pieces, byte_fallback=True, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False,
        "add_bos_token": False, "add_eos_token": False,
    }))
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_special_tokens({"additional_special_tokens": PHI3_ADDED})
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    tokenizer.model_max_length = 131072 if shape.longrope else 4096
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    # Lay tokenizer.json out as Phi-3's own: a legacy Llama normalizer (so every text segment, also one
    # after a special token, gets the "▁" prefix, as ONNX Runtime GenAI and llama.cpp expect) and
    # rstrip on the chat tokens after <|endoftext|>.
    path = out / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ]}
    spec["pre_tokenizer"] = None
    first_chat_token = tokenizer.convert_tokens_to_ids("<|endoftext|>") + 1
    for token in spec["added_tokens"]:
        token["rstrip"] = token["id"] >= first_chat_token
    path.write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")


def make_bpe_tokenizer(shape: Shape, out: Path) -> None:
    """A GPT-2-style byte-level BPE with the o200k split, plus Phi-4-mini's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=shape.pieces - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False, special_tokens=[],
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    tokenizer.add_special_tokens(["<|endoftext|>", *PHI4_ADDED])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    hf = AutoTokenizer.from_pretrained(out)
    hf.bos_token = hf.eos_token = hf.unk_token = hf.pad_token = "<|endoftext|>"
    hf.add_bos_token = False
    hf.chat_template = PHI4_CHAT_TEMPLATE
    hf.model_max_length = 131072
    hf.save_pretrained(out)
    # Loaded without a config.json, the GPT2Tokenizer class swapped in GPT-2's own split: put o200k back.
    path = out / "tokenizer.json"
    spec = json.loads(path.read_text())
    spec["pre_tokenizer"] = json.loads(tokenizer.to_str())["pre_tokenizer"]
    path.write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")


def rope_factors(count: int, top: float, power: float, start: float = 1.0) -> list[float]:
    """Smooth, increasing per-dimension longrope factors from ``start`` to ``top`` (float32-exact)."""
    values = [start * (top / start) ** ((i / (count - 1)) ** power) for i in range(count)]
    return [float(torch.tensor(v, dtype=torch.float32)) for v in values]


def hub_config(shape: Shape, tokenizer: PreTrainedTokenizerBase) -> dict:
    """config.json as the hub's Phi checkpoints write it (``rope_scaling``, ``rope_theta``)."""
    head_dim = shape.hidden // shape.heads
    rotary_half = int(head_dim * shape.partial_rotary) // 2
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<s>") if shape.tokenizer == "spm" else eos,
        "embd_pdrop": 0.0,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": 131072 if shape.longrope else 4096,
        "model_type": "phi3",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "original_max_position_embeddings": 4096,
        "pad_token_id": eos,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": shape.sliding_window,
        "tie_word_embeddings": shape.tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }
    if shape.partial_rotary != 1.0:
        config["partial_rotary_factor"] = shape.partial_rotary
    if shape.longrope:
        config["rope_scaling"] = {
            "long_factor": rope_factors(rotary_half, top=40.0, power=1.5, start=1.08),
            "short_factor": rope_factors(rotary_half, top=2.0, power=2.0),
            "type": "longrope",
        }
    return config


def token_stream(shape: Shape, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The whole corpus as one id stream, its chat turns in the family's own format (the corpus is
    written in Phi-3's; Phi-4-mini puts no newline after the role and end markers)."""
    text = CORPUS.read_text()
    if shape.tokenizer == "bpe":
        text = re.sub(r"(<\|(?:user|assistant|end)\|>)\n", r"\1", text)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def train(shape: Shape, config: dict, ids: torch.Tensor, steps: int = 400) -> Phi3ForCausalLM:
    """A few hundred AdamW steps of next-token prediction: enough to move far from uniform."""
    torch.manual_seed(shape.seed)
    model = Phi3ForCausalLM(Phi3Config(**{k: v for k, v in config.items() if k != "torch_dtype"}))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    seq, batch = 128, 16
    generator = torch.Generator().manual_seed(shape.seed)
    for step in range(steps):
        lr = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {shape.name} step {step:4d} loss {loss.item():.3f}", flush=True)
    return model.eval()


def save_weights(model: Phi3ForCausalLM, shape: Shape, out: Path) -> None:
    """bfloat16 safetensors in the hub's tensor names; a tied model has no lm_head tensor."""
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if shape.tied:
        state.pop("lm_head.weight", None)
    save_file(dict(sorted(state.items())), out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)


def make(shape: Shape) -> None:
    out = OUT / shape.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (make_spm_tokenizer if shape.tokenizer == "spm" else make_bpe_tokenizer)(shape, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = hub_config(shape, tokenizer)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>")]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": stops, "pad_token_id": stops[0]},
        indent=2, sort_keys=True) + "\n")
    # Train on the tokenizer as users load it: beside config.json. Without one, transformers 5 takes
    # tokenizer_class GPT2Tokenizer at its word and rebuilds GPT-2's own split, not tokenizer.json's.
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = train(shape, config, token_stream(shape, tokenizer))
    save_weights(model, shape, out)


@dataclass(frozen=True)
class MultimodalShape:
    """The multimodal look-alike: a text model above, and the tiny encoders it adds."""

    name: str
    imitates: str
    text: str  # the embedded text model whose tokenizer and decoder it takes
    vision_hidden: int = 64
    vision_layers: int = 2
    audio_hidden: int = 64
    seed: int = 44


MULTIMODAL = [MultimodalShape("phi4-multimodal-tiny", "microsoft/Phi-4-multimodal-instruct", "phi4-mini-tiny")]


def make_multimodal(shape: MultimodalShape) -> None:
    """Phi-4-multimodal's layout in transformers' native classes, written by their own save_pretrained."""
    text = OUT / shape.text
    out = OUT / shape.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # Phi-4-multimodal's tokenizer names its image and audio placeholders (<|endoftext10|> and 11, ids 200010
    # and 200011, in the real one); here they follow phi4-mini-tiny's chat tokens.
    placeholders = {"image_token": "<|image|>", "audio_token": "<|audio|>"}
    tokenizer = AutoTokenizer.from_pretrained(text, extra_special_tokens=placeholders)
    tokenizer.add_tokens(list(placeholders.values()), special_tokens=True)
    image_id, audio_id = tokenizer.convert_tokens_to_ids(list(placeholders.values()))
    base = json.loads((text / "config.json").read_text())
    rope = base["rope_scaling"]
    config = Phi4MultimodalConfig(
        vocab_size=base["vocab_size"], hidden_size=base["hidden_size"], intermediate_size=base["intermediate_size"],
        num_hidden_layers=base["num_hidden_layers"], num_attention_heads=base["num_attention_heads"],
        num_key_value_heads=base["num_key_value_heads"], max_position_embeddings=base["max_position_embeddings"],
        original_max_position_embeddings=base["original_max_position_embeddings"],
        tie_word_embeddings=base["tie_word_embeddings"], bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"],
        rope_parameters={"rope_type": "longrope", "rope_theta": base["rope_theta"],
                         "partial_rotary_factor": base["partial_rotary_factor"],
                         "long_factor": rope["long_factor"], "short_factor": rope["short_factor"],
                         "original_max_position_embeddings": base["original_max_position_embeddings"]},
        vision_config={"hidden_size": shape.vision_hidden, "intermediate_size": 2 * shape.vision_hidden,
                       "num_hidden_layers": shape.vision_layers, "num_attention_heads": 2,
                       "image_token_id": image_id},
        audio_config={"hidden_size": shape.audio_hidden, "intermediate_size": 2 * shape.audio_hidden,
                      "num_blocks": 1, "num_attention_heads": 2, "ext_pw_out_channel": shape.audio_hidden,
                      "depthwise_separable_out_channel": shape.audio_hidden,
                      "nemo_conv_channels": shape.audio_hidden, "audio_token_id": audio_id},
    )
    torch.manual_seed(shape.seed)
    model = Phi4MultimodalForCausalLM(config)
    trained = load_file(text / "model.safetensors")
    state = model.state_dict()
    for name, tensor in trained.items():  # the decoder's tensors have the same names in both classes
        state[name].copy_(tensor)
    model.to(torch.bfloat16).save_pretrained(out)
    (out / "model.safetensors").chmod(0o644)
    tokenizer.save_pretrained(out)
    processor = Phi4MultimodalProcessor(image_processor=Phi4MultimodalImageProcessor(),
                                        audio_processor=Phi4MultimodalFeatureExtractor(), tokenizer=tokenizer,
                                        chat_template=(text / "chat_template.jinja").read_text())
    processor.save_pretrained(out)
    shutil.copy(text / "generation_config.json", out / "generation_config.json")


def make_image() -> None:
    """A small picture (a red circle, a blue square, a green bar on light grey) for the smoke and parity checks:
    smaller than one crop, so the processor adds its global view and one tile, as for any photo. Not on white: the
    processor pads with white, and onnxruntime-genai cannot tell an image's white edge from padding
    (backends/onnx/vision.py)."""
    image = Image.new("RGB", (96, 64), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 42, 42), fill=(220, 30, 30))
    draw.rectangle((52, 10, 88, 46), fill=(30, 60, 220))
    draw.rectangle((4, 52, 92, 60), fill=(20, 160, 60))
    image.save(IMAGE, optimize=False)


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for shape in SHAPES:
        if not names or shape.name in names:
            print(f"making {shape.name} (shape of {shape.imitates})", flush=True)
            make(shape)
    for multimodal in MULTIMODAL:
        if not names or multimodal.name in names:
            print(f"making {multimodal.name} (shape of {multimodal.imitates}, on {multimodal.text})", flush=True)
            make_multimodal(multimodal)
    if not names or "image" in names:
        make_image()


if __name__ == "__main__":
    main(sys.argv[1:])
