"""Phi-4-multimodal for ONNX Runtime GenAI (model type ``phi4mm``): transformers' native
``Phi4MultimodalForCausalLM`` as the three ONNX models onnxruntime-genai's multimodal pipeline runs.

- ``decoder.onnx``: the language model without its token embedding, made by the model builder in-process as for
  the text models (builder.py: machine-independent rotary caches, int4/int8 one weight at a time), in the target's
  precision with its parameters. The builder knows no native Phi4Multimodal: it reads a staged copy of the source
  whose config.json says Phi3VForCausalLM (the same decoder, Phi-3 with LongRoPE) and gives LongRoPE's ``type``
  where the builder looks for it. The source is not changed.
- ``vision.onnx`` (image encoder, HD crop layout, projection) and ``embedding.onnx`` (token embedding, image
  features in place of the image tokens): re-implementations of transformers' modules, exported by torch.onnx's
  TorchScript exporter. Both stay float32 at every precision, as the Phi cookbook's ONNX vision recipe runs them
  on the CPU.
- ``vision_processor.json``: onnxruntime-extensions' Phi-4 image preprocessing, with the source's settings.

onnxruntime-genai 0.18.0 has two bugs on this path; the artifact avoids both under its standard flow
(``og.MultiModalProcessor``, then ``og.Generator``):

- Its processor expands only token id 200010 (``<|endoftext10|>``, the real model's image token) into an image's
  tokens. A model whose image token is another id gets that token added to its tokenizer.json, and its
  embedding model reads 200010 as its own image token.
- It hands the image processor's int64 crop masks to the vision model as float32 (the first half of their
  bytes, read as floats). vision.onnx takes that input and ignores it. It also takes ``num_image_tokens``, which
  the runtime feeds to any model input of that name, and rebuilds the masks: the padding lies at the bottom or
  the right of the last row or column of crops, the token count says how many 2x2-patch cells it leaves there,
  and the pixels settle the last patch (masked when the padding's white covers it). Where the image's own edge
  next to the padding is pure white too, that patch is taken as padding; transformers, which knows the image's
  size, may keep it.

Verified on phi4-multimodal-tiny, fp32 and int4: builds in fresh processes into other directories give the same
bytes. Through the standard flow, the last position's logits after an image prompt are transformers' (float32,
eager attention) to 6e-5 in fp32 (5e-6 for an image of exactly one crop), with a KL of 2e-3 nats in int4, where
onnxruntime-extensions resizes an image as transformers does; the vision model alone, given transformers' pixels
and a garbage mask, gives its image features to 2e-4 from 1 to 36 crops, padded at the bottom or the right.
One image per prompt; no speech (the speech model is not exported).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ... import sources
from ...errors import BuildError
from .. import SMOKE_IMAGE, SMOKE_QUESTION, SMOKE_TOKENS, Job, Runtime, Smoke
from .builder import TITLE, run_builder

GENAI_IMAGE_TOKEN = 200010  # <|endoftext10|>, the only image token onnxruntime-genai's phi4mm processor expands
OPSET = 17
IMAGE_EMBED = "model.embed_tokens_extend.image_embed."  # the checkpoint's names of the parts exported here
EMBED_TOKENS = "model.embed_tokens.weight"
BICUBIC = 3  # PIL's filter number: the resize onnxruntime-extensions' Phi4VisionProcessor does ("CUBIC")


def build(job: Job) -> None:
    """The decoder by the model builder, then the vision and embedding models, then the runtime's configs."""
    from transformers import AutoImageProcessor

    scratch = job.output.parent
    staged = scratch / "vision-source"
    try:
        _stage(job.source, staged, job.trust_remote_code)
        run_builder(job, staged, "exclude_embeds=true", "filename=decoder.onnx")
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    config, image_embed, embed_tokens = _image_parts(job.source)
    images = AutoImageProcessor.from_pretrained(job.source, local_files_only=True)
    vision = config.vision_config
    if (images.size["height"], images.patch_size) != (vision.crop_size, vision.patch_size):
        raise BuildError(f"{job.source}: the image processor's crops ({images.size['height']} pixels, patches of "
                         f"{images.patch_size}) are not the vision encoder's ({vision.crop_size}, {vision.patch_size})")
    if (images.resample, images.do_convert_rgb) != (BICUBIC, True):
        raise BuildError(f"{job.source}: its image processor resamples with PIL filter {images.resample} and "
                         f"do_convert_rgb {images.do_convert_rgb}; onnxruntime-genai's Phi-4 preprocessing resizes "
                         "bicubically (filter 3) into RGB, so the artifact would see other pixels")
    exported = scratch / "vision-export"
    exported.mkdir()
    try:
        _export(config, image_embed, embed_tokens, images, exported, job.output)
    finally:
        shutil.rmtree(exported, ignore_errors=True)
    _write_configs(job.output, vision.image_token_id, images)


def smoke(artifact: Path, job: Job) -> Smoke:
    """Generate greedily from the chat prompt about SMOKE_IMAGE, through the runtime's standard multimodal flow."""
    og, model, inputs = _prompt(artifact)
    prompt = int(inputs["input_ids"].as_numpy().shape[-1])
    search = og.GeneratorParams(model)
    search.set_search_options(max_length=prompt + SMOKE_TOKENS, do_sample=False)
    generator = og.Generator(model, search)
    generator.set_inputs(inputs)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    text = og.Tokenizer(model).decode(tokens)
    return Smoke.generated(TITLE, tokens, text, f", with {SMOKE_IMAGE.name} ({prompt} prompt tokens, image included)")


def image_logits(artifact: Path, job: Job) -> np.ndarray:
    """The last prompt position's logits (float32, [vocab]) after the chat prompt about SMOKE_IMAGE, as the
    runtime's standard flow computes them before the first token."""
    runtime = VisionRuntime(artifact)
    return np.asarray(runtime.after_prompt(runtime.length + 1).get_logits(), dtype=np.float32).reshape(-1)


class VisionRuntime(Runtime):
    """onnxruntime-genai's generator after the image prompt, run by its standard flow; the text that follows is
    appended to it as tokens."""

    def __init__(self, artifact: Path):
        self.og, self.model, self.prompt = _prompt(artifact)
        self.length = int(self.prompt["input_ids"].as_numpy().shape[-1])
        self.settings = f"onnxruntime-genai, CPU execution provider, after an image prompt of {self.length} tokens"

    def after_prompt(self, total: int) -> Any:
        """A generator of ``total`` tokens in all that has run the image prompt."""
        search = self.og.GeneratorParams(self.model)
        search.set_search_options(max_length=total, min_length=total)  # no early end of text
        generator = self.og.Generator(self.model, search)
        generator.set_inputs(self.prompt)  # runs the prompt, image included
        return generator

    def logits(self, ids: Sequence[int]) -> Any:
        generator = self.after_prompt(self.length + len(ids) + 1)
        generator.append_tokens(list(ids))
        return np.asarray(generator.get_output("logits"), dtype=np.float32)[0]

    def decode(self, ids: Sequence[int], count: int) -> float:
        generator = self.after_prompt(self.length + len(ids) + count + 1)
        generator.append_tokens(list(ids))
        generator.generate_next_token()  # picks the first token from the logits at hand: no model run
        start = time.perf_counter()
        for _ in range(count):
            generator.generate_next_token()
        return count / (time.perf_counter() - start)


def _prompt(artifact: Path) -> tuple[Any, Any, Any]:
    """onnxruntime_genai, the artifact's model, and its processor's inputs for the chat prompt about SMOKE_IMAGE."""
    import onnxruntime  # noqa: F401  (first: onnxruntime_genai 0.18 aborts when it loads onnxruntime itself)
    import onnxruntime_genai as og

    model = og.Model(str(artifact))
    messages = [{"role": "user", "content": f"<|image_1|>{SMOKE_QUESTION}"}]
    prompt = og.Tokenizer(model).apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    inputs = model.create_multimodal_processor()(prompt, images=og.Images.open(str(SMOKE_IMAGE)))
    return og, model, inputs


def _stage(source: Path, staged: Path, trust_remote_code: bool) -> None:
    """Links to the source's files in ``staged``, with a config.json the model builder reads as Phi-3-vision's."""
    staged.mkdir()
    for path in sources.source_files(source, trust_remote_code):
        link = staged / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link == staged / "config.json":
            config = sources.read_config(source)
            config["architectures"] = ["Phi3VForCausalLM"]
            rope = config.get("rope_parameters") or {}
            if "rope_type" in rope:
                rope["type"] = rope["rope_type"]  # transformers 5 writes rope_type only; the builder reads type
            link.write_text(json.dumps(config, indent=2), encoding="utf-8")
        else:
            link.symlink_to(path.resolve())


def _image_parts(source: Path) -> tuple[Any, nn.Module, nn.Module]:
    """The model's config, and the two parts the vision and embedding models hold (the image embedding and the
    token embedding) in float32, their weights read from the checkpoint by name: the decoder, most of the model,
    is never loaded (at Phi-4-multimodal's size, the whole model in float32 is 22 GB)."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalImageEmbedding

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    image_embed = Phi4MultimodalImageEmbedding(config)
    embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
    wanted = {f"{IMAGE_EMBED}{name}": (image_embed, name) for name in image_embed.state_dict()}
    wanted[EMBED_TOKENS] = (embed_tokens, "weight")
    states: dict[nn.Module, dict[str, torch.Tensor]] = {image_embed: {}, embed_tokens: {}}
    for shard in sorted(source.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118  (a safetensors file is not a mapping)
                if key in wanted:
                    module, name = wanted[key]
                    states[module][name] = weights.get_tensor(key).float()
    for module, state in states.items():
        module.load_state_dict(state, strict=True)  # every tensor found, or a clear error naming the missing
    return config, image_embed.float().eval(), embed_tokens.float().eval()


def _export(config, image_embed: nn.Module, embed_tokens: nn.Module, images, scratch: Path, output: Path) -> None:
    """vision.onnx and embedding.onnx, each with its weights in one ``.onnx.data`` file beside it."""
    import onnx

    vision = _Vision(image_embed, config.vision_config.feature_layer, images).eval()
    embedding = _Embedding(embed_tokens, config.vision_config.image_token_id).eval()
    crop, side, half = vision.crop, vision.side, vision.half
    # A dummy image of 1 x 2 crops whose right 2 cells (4 patch columns) are padding: no shape is fixed by it.
    # Its tokens: the global crop's rows, each ended by a separator, one separator, then the same for the others.
    tokens = half * (half + 1) + 1 + half * (2 * half - 2 + 1)
    vision_inputs = (torch.zeros(1, 3, 3, crop, crop), torch.tensor([[crop, 2 * crop]]), torch.tensor([[tokens]]))
    ids = torch.tensor([[1, config.vision_config.image_token_id, GENAI_IMAGE_TOKEN, 5]])
    # The tracer warns of every Python value it takes for a constant; the graph is checked against transformers
    # in the tests, so the warnings say nothing to users.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(vision, vision_inputs, str(scratch / "vision.onnx"), dynamo=False, opset_version=OPSET,
                          input_names=["pixel_values", "image_sizes", "num_image_tokens"],
                          output_names=["image_features"],
                          dynamic_axes={"pixel_values": {0: "num_images", 1: "num_crops"},
                                        "image_sizes": {0: "num_images"}, "num_image_tokens": {0: "num_images"},
                                        "image_features": {0: "num_image_tokens"}})
        torch.onnx.export(embedding, (ids, torch.zeros(2, config.hidden_size)), str(scratch / "embedding.onnx"),
                          dynamo=False, opset_version=OPSET, input_names=["input_ids", "image_features"],
                          output_names=["inputs_embeds"],
                          dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                                        "image_features": {0: "num_image_tokens"},
                                        "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})
    for name in ("vision.onnx", "embedding.onnx"):
        proto = onnx.load(str(scratch / name))
        if name == "vision.onnx":
            # The runtime feeds the crop masks (and fails to load a vision model without that input): an input
            # nothing reads.
            mask = onnx.helper.make_tensor_value_info("image_attention_mask", onnx.TensorProto.FLOAT,
                                                      ["num_images", "num_crops", side, side])
            proto.graph.input.insert(1, mask)
        # The exporter writes a large model's weights one file per tensor; here one data file, as the decoder's.
        onnx.save_model(proto, str(output / name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.data", size_threshold=0)


def _write_configs(output: Path, image_token: int, images) -> None:
    """genai_config.json as the phi4mm pipeline reads it, the image preprocessing, and the image token."""
    path = output / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model"]["type"] = "phi4mm"
    config["model"]["vision"] = {
        "filename": "vision.onnx",
        "config_filename": "vision_processor.json",
        "inputs": {"pixel_values": "pixel_values", "attention_mask": "image_attention_mask",
                   "image_sizes": "image_sizes"},
        "outputs": {"image_features": "image_features"},
    }
    config["model"]["embedding"] = {
        "filename": "embedding.onnx",
        "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
        "outputs": {"inputs_embeds": "inputs_embeds"},
    }
    # The phi4mm pipeline opens a speech model unless both names are empty (its defaults are not).
    config["model"]["speech"] = {"filename": "", "config_filename": ""}
    path.write_text(json.dumps(config, indent=4), encoding="utf-8")
    base = images.size["height"]
    transforms = [
        ("decode_image", "DecodeImage", {"attrs": {"color_space": "RGB"}}),
        ("phi4_vision_dynamic_preprocess", "Phi4VisionDynamicPreprocess",
         {"attrs": {"dynamic_hd": images.dynamic_hd, "dyhd_base_resolution": base}}),
        ("rescale", "Rescale", {"inputs": [":0"], "attrs": {"rescale_factor": images.rescale_factor}}),
        ("normalize", "Normalize", {"attrs": {"mean": list(images.image_mean), "std": list(images.image_std)}}),
        ("phi4_vision_processor", "Phi4VisionProcessor",
         {"inputs": [":0", "phi4_vision_dynamic_preprocess:1"],
          "attrs": {"dyhd_base_resolution": base, "interpolation": "CUBIC"}}),
    ]
    processor = {"processor": {"name": "phi_4_image_processor", "transforms": [
        {"operation": {"name": name, "type": kind, **rest}} for name, kind, rest in transforms]}}
    (output / "vision_processor.json").write_text(json.dumps(processor, indent=4), encoding="utf-8")
    if image_token != GENAI_IMAGE_TOKEN:
        # The runtime rewrites <|image_1|> to <|endoftext10|> and expands id 200010 alone: the tokenizer must
        # know it (the embedding model reads it as the model's own image token).
        path = output / "tokenizer.json"
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
        tokenizer["added_tokens"].append({"id": GENAI_IMAGE_TOKEN, "content": "<|endoftext10|>", "single_word": False,
                                          "lstrip": False, "rstrip": False, "normalized": False, "special": True})
        path.write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False), encoding="utf-8")


def _arange_like(t: torch.Tensor) -> torch.Tensor:
    """0..len(t)-1, from t's shape at run time (``torch.arange(len(t))`` would be traced as a constant)."""
    return torch.cumsum(torch.ones_like(t, dtype=torch.int64), 0) - 1


class _Vision(nn.Module):
    """pixel_values [1, crops, 3, 448, 448] (the global crop first), image_sizes [1, 2] (the crops' height and
    width in pixels), num_image_tokens [1, 1] -> image_features [num_image_tokens, hidden]: transformers'
    Phi4MultimodalImageEmbedding for one image, without Python numbers taken from the data, so that the crop
    count stays a dimension of the graph."""

    def __init__(self, embed, feature_layer: int, images):
        super().__init__()
        encoder = embed.img_processor
        if getattr(embed, "img_processor_padding", None) is not None:
            raise BuildError("the vision encoder pads its patch grid (an odd number of patches per crop side), "
                             "which phibuild's export does not reproduce")
        self.patch_embedding = encoder.embeddings.patch_embedding
        self.position_embedding = encoder.embeddings.position_embedding
        self.side = encoder.embeddings.num_patches_per_side  # patches per crop side: 32
        self.half = self.side // 2  # 2x2-patch cells per crop side, after pooling
        self.patch = encoder.embeddings.patch_size
        self.crop = embed.crop_size
        self.layers = encoder.encoder.layers[: feature_layer % (len(encoder.encoder.layers) + 1)]
        self.up, self.down = embed.img_projection_up, embed.img_projection_down
        self.global_separator = embed.global_img_feature_extensor
        self.row_end = embed.sub_img_feature_extensor
        self.register_buffer("boundaries", torch.arange(1 / self.side, 1.0, 1 / self.side), persistent=False)
        # Halfway between 254 and 255 once normalized: the padding's white, 255, is above it.
        mean, std = torch.tensor(images.image_mean), torch.tensor(images.image_std)
        white = ((254.5 * images.rescale_factor - mean) / std).reshape(1, 3, 1, 1).float()
        self.register_buffer("white", white, persistent=False)

    def forward(self, pixel_values, image_sizes, num_image_tokens):
        side, half = self.side, self.half
        x = pixel_values[0]
        n = x.shape[0]
        crops_h, crops_w = image_sizes[0, 0] // self.crop, image_sizes[0, 1] // self.crop
        crop = _arange_like(x[:, 0, 0, 0]) - 1  # the sub-crop of each crop, -1 for the global one
        rows, cols = self.kept(x, crop, crops_h, crops_w, num_image_tokens.sum())
        cells_h, cells_w = (rows + 1) // 2, (cols + 1) // 2  # a cell is kept when its first patch is
        patches = torch.arange(side)
        row_kept = side * (crop // crops_w)[:, None] + patches < rows
        col_kept = side * (crop % crops_w)[:, None] + patches < cols
        mask = (row_kept[:, :, None] & col_kept[:, None, :]) | (crop < 0)[:, None, None]  # [crops, side, side]
        h = self.patch_embedding(x).flatten(2).transpose(1, 2)
        # Position ids as Phi4MultimodalVisionEmbeddings buckets them over a crop's kept patches.
        step_h = 1.0 / mask[:, :, 0].sum(1).float()
        step_w = 1.0 / mask[:, 0, :].sum(1).float()
        index = patches.float()
        bucket_h = (torch.clamp(index[None, :] * step_h[:, None], max=1.0 - 1e-6)[..., None]
                    >= self.boundaries).sum(-1)
        bucket_w = (torch.clamp(index[None, :] * step_w[:, None], max=1.0 - 1e-6)[..., None]
                    >= self.boundaries).sum(-1)
        position = (bucket_h[:, :, None] * side + bucket_w[:, None, :]).reshape(n, -1)
        flat_mask = mask.reshape(n, -1)
        h = h + self.position_embedding(torch.where(flat_mask, position, torch.zeros_like(position)))
        bias = torch.where(flat_mask[:, None, None, :], 0.0, torch.finfo(torch.float32).min)
        for layer in self.layers:
            h = h + self.attention(layer.self_attn, layer.layer_norm1(h), bias)
            h = h + layer.mlp(layer.layer_norm2(h))
        f = nn.functional.avg_pool2d(h.reshape(n, side, side, -1).permute(0, 3, 1, 2), 2, 2).permute(0, 2, 3, 1)
        dim = f.shape[-1]
        row_end = self.row_end.reshape(1, dim)
        whole = torch.cat([f[0], row_end.expand(half, dim)[:, None, :]], dim=1).reshape(-1, dim)
        # The sub-crops' cells in rows of the HD image, each row cut at its last kept cell and ended by
        # row_end: gathered from [row_end, every sub-crop cell] by index (0 for row_end).
        cells = torch.cat([row_end, f[1:].reshape(-1, dim)], dim=0)
        r = _arange_like(f[1:, :, 0, 0].reshape(-1))[:, None]  # more rows and columns than there can be
        c = torch.cat([r[:, 0], r[-1:, 0] + 1])[None, :]
        kept = (r < cells_h) & (c <= cells_w)
        index = ((r // half) * crops_w + c // half) * (half * half) + (r % half) * half + c % half + 1
        index = torch.where(c < cells_w, index, torch.zeros_like(index))
        features = torch.cat([cells[index[kept]], self.global_separator.reshape(1, dim), whole], dim=0)
        return self.down(nn.functional.gelu(self.up(features)))

    def kept(self, x, crop, crops_h, crops_w, tokens):
        """How many patch rows and columns of the sub-crops' HD grid are the image's, the rest padding."""
        side, half = self.side, self.half
        height, width = half * crops_h, half * crops_w  # in cells
        cells = tokens - (half * half + 1 + half)  # the global crop's tokens and the separator are fixed
        # Padded at the bottom: every column kept, rows of width + 1 tokens; else at the right.
        cells_h = cells // (width + 1)
        bottom = (cells % (width + 1) == 0) & (cells_h > height - half) & (cells_h <= height)
        cells_h = torch.where(bottom, cells_h, height)
        cells_w = torch.where(bottom, width, cells // height - 1)
        # Each cell is 2 patches: the second is masked when the padding covers it, which the pixels say.
        darkest = (x - self.white).amin(dim=1)  # [crops, pixels, pixels], >= 0 where white
        patch_rows = darkest.amin(dim=2).reshape(-1, side, self.patch).amin(dim=2)  # [crops, side]
        patch_cols = darkest.amin(dim=1).reshape(-1, side, self.patch).amin(dim=2)
        row, col = 2 * cells_h - 1, 2 * cells_w - 1
        white_row = self.covered(patch_rows, (crop >= 0) & (crop // crops_w == row // side), row % side)
        white_col = self.covered(patch_cols, (crop >= 0) & (crop % crops_w == col // side), col % side)
        cut_row = (cells_w == width) & white_row
        cut_col = (cells_h == height) & ~cut_row & white_col
        return 2 * cells_h - cut_row.long(), 2 * cells_w - cut_col.long()

    @staticmethod
    def covered(darkest, crops, patch):
        """Whether patch row (or column) ``patch`` of the selected crops is white all over."""
        values = torch.index_select(darkest, 1, patch.reshape(1))[:, 0]
        return torch.where(crops, values, torch.ones_like(values)).amin() >= 0

    @staticmethod
    def attention(attention, h, bias):
        batch, length, _ = h.shape
        heads, size = attention.num_heads, attention.head_dim
        q = attention.q_proj(h).view(batch, length, heads, size).transpose(1, 2)
        k = attention.k_proj(h).view(batch, length, heads, size).transpose(1, 2)
        v = attention.v_proj(h).view(batch, length, heads, size).transpose(1, 2)
        weights = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attention.scaling + bias, dim=-1)
        return attention.out_proj(torch.matmul(weights, v).transpose(1, 2).reshape(batch, length, -1))


class _Embedding(nn.Module):
    """input_ids [batch, length], image_features [tokens, hidden] -> inputs_embeds [batch, length, hidden]:
    the token embedding, with the i-th image token's replaced by image_features[i]."""

    def __init__(self, embed_tokens, image_token: int):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token = image_token

    def forward(self, input_ids, image_features):
        image = input_ids == self.image_token
        if self.image_token != GENAI_IMAGE_TOKEN:
            image = image | (input_ids == GENAI_IMAGE_TOKEN)
        embeds = self.embed_tokens(torch.where(image, torch.full_like(input_ids, self.image_token), input_ids))
        order = torch.cumsum(image.reshape(-1).long(), 0).reshape(input_ids.shape)
        order = torch.where(image, order, torch.zeros_like(order))  # 0: the row of zeros below
        features = torch.cat([torch.zeros_like(embeds[0, :1]), image_features], 0)
        return torch.where(image[..., None], features[order], embeds)
