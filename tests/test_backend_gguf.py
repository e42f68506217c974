"""llama.cpp GGUF backend: our converter, llama.cpp's quantizer and runtime, on every embedded model.

One doit run builds int4, int8 and fp32 of the three embedded models; most tests read those artifacts.
A second project with its own store builds them again, for byte identity.
"""

from __future__ import annotations

import json
import math
import re
import tracemalloc
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from conftest import Run, copy_model, lock_of, prompt_for, reference_logits, run_doit, tiny_phimoe, write_project
from safetensors.torch import load_file
from transformers import AutoTokenizer, Phi3Config

from phibuild.backends import get
from phibuild.backends.gguf import TYPES, llama, quantize
from phibuild.backends.gguf.convert import O200K, Rope, convert
from phibuild.catalog import EMBEDDED_DIR, EMBEDDED_TEXT
from phibuild.errors import ConfigError, UnsupportedError
from phibuild.project import Project

PRECISIONS = ["int4", "int8", "fp32"]
SENTENCES = [
    "Return the absolute path of a file.",
    "os.path.join('a', 'b') == 'a/b'  # 42 ok? 12345 3.14159",
    "  two  spaces\n\n\tand a tab, I'VE said HelloWorld; don't!",
    "Übergrößen café ... naïve ½ 😀",
    "<|system|>Be brief.<|end|><|user|>\nHi<|end|>\n<|assistant|>\nHello",
]
TOKEN = gguf.TokenType


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Run]:
    root = write_project(tmp_path_factory.mktemp("gguf"), EMBEDDED_TEXT, ["gguf"], PRECISIONS)
    run = run_doit(root, "quantize")
    assert run.code == 0, run.output
    return root, run


def artifact(built, model: str, precision: str) -> Path:
    return built[0] / "build" / f"{model}-{precision}-gguf" / "model.gguf"


def reference(model: str) -> tuple[list[int], np.ndarray]:
    return reference_logits(EMBEDDED_DIR / model, prompt_for(model))


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Next-token logits from llama.cpp, with a float32 KV cache (its default F16 cache rounds)."""
    llm = llama(path, n_ctx=128, n_threads=2, logits_all=True, verbose=False, type_k=llama_cpp.GGML_TYPE_F32,
                type_v=llama_cpp.GGML_TYPE_F32)
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1])


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()} | {
        "tensors": {t.name: t for t in reader.tensors}}


def tokenizer_file(model_dir: Path) -> dict:
    return json.loads((model_dir / "tokenizer.json").read_text())


# -- the build -----------------------------------------------------------------------------------


def test_quantized_variants_share_one_conversion(built):
    root, run = built
    lock = lock_of(root)
    project = Project.load(root)
    for model in EMBEDDED_TEXT:
        # one F16 conversion shared by int4 and int8, one F32 conversion that is the fp32 artifact
        assert run.built.count(f"{model}-gguf-f16") == run.built.count(f"{model}-gguf-f32") == 1
        int4, int8, fp32 = (lock[f"{model}-{p}-gguf"] for p in PRECISIONS)
        assert int4["intermediate"] == int8["intermediate"] != fp32["intermediate"]
        shared = project.store.get(int4["intermediate"]["key"])
        assert shared.manifest.parts.params == {"outtype": "f16"}
        assert shared.manifest.parts.toolchain.packages == int4["versions"]
        converted = project.store.get(fp32["intermediate"]["key"]).artifact / "model.gguf"
        stored = project.store.get(fp32["key"]).artifact / "model.gguf"
        assert stored.stat().st_ino == converted.stat().st_ino  # a hardlink, not a second copy
    assert set(run.built) == {f"{m}-gguf-{t}" for m in EMBEDDED_TEXT for t in ("f16", "f32")} | set(lock)
    assert {"llama-cpp-python", "gguf", "numpy"} <= set(lock["phi3-tiny-int4-gguf"]["versions"])


def test_smoke_checks_ran_and_are_recorded(built):
    lock = lock_of(built[0])
    assert len(lock) == 9
    for name, entry in lock.items():
        assert re.fullmatch(r"ok: [1-8] tokens from a Phi chat prompt: '.*'", entry["smoke"]["result"], re.DOTALL), name


def test_builds_are_byte_identical_across_projects(built, tmp_path):
    root = write_project(tmp_path, EMBEDDED_TEXT, ["gguf"], PRECISIONS)
    assert run_doit(root, "quantize").code == 0
    first, second = lock_of(built[0]), lock_of(root)
    assert {n: e["files"] for n, e in first.items()} == {n: e["files"] for n, e in second.items()}
    assert {n: e["key"] for n, e in first.items()} == {n: e["key"] for n, e in second.items()}


def test_thread_count_does_not_change_the_bytes(built, tmp_path):
    project = Project.load(built[0])
    entry = lock_of(built[0])["phi35-tiny-int4-gguf"]
    converted = project.store.get(entry["intermediate"]["key"]).artifact / "model.gguf"
    for kind in ("Q4_K_M", "Q5_0"):
        outputs = []
        for threads in (1, 2):
            outputs.append(tmp_path / f"{kind}-{threads}.gguf")
            quantize(converted, outputs[-1], kind, threads)
        assert outputs[0].read_bytes() == outputs[1].read_bytes()
    assert (tmp_path / "Q4_K_M-1.gguf").read_bytes() == artifact(built, "phi35-tiny", "int4").read_bytes()


# -- what the GGUF holds -------------------------------------------------------------------------


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_fp32_gives_the_logits_of_transformers(built, model):
    ids, expected = reference(model)
    got = llama_logits(artifact(built, model, "fp32"), ids)
    # float32 weights, activations and KV cache on both sides; only summation order differs. Logits
    # are of size ~10, so this is 1e-5 relative: rope factors, attention factor, partial rotary
    # dimensions, tied output and the GQA layout all have to be right.
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_quantized_logits_are_close_and_measurably_lossy(built, model):
    ids, expected = reference(model)
    scale = np.abs(expected).max()
    for precision, bound in (("int8", 0.01), ("int4", 0.06)):
        error = np.abs(llama_logits(artifact(built, model, precision), ids) - expected).max()
        assert 1e-3 < error < bound * scale, (precision, error)


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_llama_cpp_tokenizes_like_transformers(built, model):
    llm = llama_cpp.Llama(str(artifact(built, model, "int4")), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(EMBEDDED_DIR / model)
    for text in [*SENTENCES, prompt_for(model)]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text, add_special_tokens=False).input_ids
        # add_bos=True means "add what the model adds": the GGUF's add_bos/add_eos flags
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text).input_ids


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_metadata_is_what_llama_cpp_reads(built, model):
    config = json.loads((EMBEDDED_DIR / model / "config.json").read_text())
    spec = tokenizer_file(EMBEDDED_DIR / model)
    meta = fields(artifact(built, model, "fp32"))
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    rope = config.get("rope_scaling") or {}
    assert meta["general.architecture"] == "phi3"
    assert {key.removeprefix("phi3."): meta[key] for key in meta if key.startswith("phi3.")} == pytest.approx({
        "context_length": config["max_position_embeddings"],
        "rope.scaling.original_context_length": config["original_max_position_embeddings"],
        "embedding_length": hidden,
        "feed_forward_length": config["intermediate_size"],
        "block_count": config["num_hidden_layers"],
        "attention.head_count": heads,
        "attention.head_count_kv": config["num_key_value_heads"],
        "attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        "rope.dimension_count": int(hidden // heads * config.get("partial_rotary_factor", 1.0)),
        "rope.freq_base": config["rope_theta"],
        "attention.sliding_window": config["sliding_window"] or 0,
        **({"rope.scaling.attn_factor": math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))} if rope else {}),
    })
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    tensors = meta["tensors"]
    if rope:
        assert tensors["rope_factors_long.weight"].data.tolist() == pytest.approx(rope["long_factor"])
        assert tensors["rope_factors_short.weight"].data.tolist() == pytest.approx(rope["short_factor"])
    else:
        assert "rope_factors_long.weight" not in tensors
    assert ("output.weight" in tensors) == (not config["tie_word_embeddings"])  # llama.cpp reuses token_embd
    assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [hidden, hidden * (1 + 2 * config[
        "num_key_value_heads"] // heads)]  # fused, as llama.cpp's phi3 wants
    assert tensors["blk.0.ffn_up.weight"].shape.tolist() == [hidden, 2 * config["intermediate_size"]]

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config["vocab_size"] == tensors["token_embd.weight"].shape[1]
    added = {t["id"]: t for t in spec["added_tokens"]}
    last = max(added)
    assert tokens[last + 1 :] == [f"[PAD{i}]" for i in range(last + 1, len(tokens))]
    assert set(types[last + 1 :]) == {TOKEN.UNUSED}
    for i, token in added.items():
        assert tokens[i] == token["content"]
        if i > 2:  # SentencePiece's own <unk>/<s>/</s> keep their types; chat tokens are control tokens
            assert types[i] == (TOKEN.CONTROL if token["special"] else TOKEN.USER_DEFINED)
    if (EMBEDDED_DIR / model / "tokenizer.model").is_file():
        assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
        assert types[0] == TOKEN.UNKNOWN and TOKEN.BYTE in types and len(meta["tokenizer.ggml.scores"]) == len(tokens)
        assert meta["general.name"] == "Phi-3"  # turns on llama.cpp's rstrip of the chat tokens, as tokenizer.json
    else:
        assert meta["tokenizer.ggml.model"] == "gpt2"
        assert meta["tokenizer.ggml.pre"] == ("gpt-4o" if "Split" in json.dumps(spec["pre_tokenizer"]) else "gpt-2")
        assert len(meta["tokenizer.ggml.merges"]) == len(spec["model"]["merges"])
        assert meta["general.name"] == "Phi"  # no rstrip: llama.cpp's Phi-3 rule must stay off
    hf = AutoTokenizer.from_pretrained(EMBEDDED_DIR / model)
    assert meta["tokenizer.ggml.bos_token_id"] == hf.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == hf.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == (EMBEDDED_DIR / model / "chat_template.jinja").read_text()


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_quantized_files_hold_the_asked_types(built, model):
    int4, int8 = fields(artifact(built, model, "int4")), fields(artifact(built, model, "int8"))
    assert int4["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert int8["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    Q = gguf.GGMLQuantizationType
    assert int4["tensors"]["blk.0.attn_qkv.weight"].tensor_type in (Q.Q4_K, Q.Q5_K, Q.Q6_K)
    assert {t.tensor_type for t in int8["tensors"].values() if len(t.shape) == 2} == {Q.Q8_0}


# -- the converter on its own --------------------------------------------------------------------


@pytest.mark.parametrize(("outtype", "bound"), [("f16", 5e-4), ("bf16", 2e-3), ("q8_0", 0.01)])
def test_converter_writes_f16_bf16_and_q8_0_directly(tmp_path, outtype, bound):
    convert(EMBEDDED_DIR / "phi35-tiny", tmp_path / "model.gguf", outtype)
    meta = fields(tmp_path / "model.gguf")
    Q = gguf.GGMLQuantizationType
    assert meta["tensors"]["blk.0.ffn_down.weight"].tensor_type == Q[outtype.upper()]
    assert meta["tensors"]["blk.0.attn_norm.weight"].tensor_type == Q.F32
    ids, expected = reference("phi35-tiny")
    assert np.abs(llama_logits(tmp_path / "model.gguf", ids) - expected).max() < bound * np.abs(expected).max()


def test_converter_streams_one_tensor_at_a_time(tmp_path):
    tracemalloc.start()
    try:
        convert(EMBEDDED_DIR / "phi3-tiny", tmp_path / "model.gguf", "f32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    largest = max(t.n_bytes for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors)
    # the output tensor being filled and one converted chunk; reading the model whole would take 5x this
    assert peak < 2.5 * largest < (tmp_path / "model.gguf").stat().st_size / 2


@pytest.mark.parametrize("model", ["phi35-tiny", "phi4-mini-tiny"])
def test_rope_parameters_read_alike_from_old_and_new_config_keys(tmp_path, model):
    """Hub configs say ``rope_scaling`` / ``type``; transformers 5 saves ``rope_parameters`` / ``rope_type``."""
    old = json.loads((EMBEDDED_DIR / model / "config.json").read_text())
    Phi3Config.from_pretrained(EMBEDDED_DIR / model).save_pretrained(tmp_path)
    new = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" not in new and new["rope_parameters"]["rope_type"] == "longrope"
    assert Rope.of(new) == Rope.of(old)
    assert len(Rope.of(old).long_factors) == Rope.of(old).dimensions // 2 > 0


def test_o200k_pre_tokenizer_is_llama_cpps_gpt_4o(tmp_path):
    """Phi-4-mini splits with the o200k regex before its byte-level BPE; llama.cpp calls that gpt-4o."""
    hf, llm = {}, {}
    for split in ("gpt-2", "o200k"):
        source = copy_model("phi4-mini-tiny", tmp_path / split)
        spec = tokenizer_file(source)
        spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                 "use_regex": True} if split == "gpt-2" else {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": O200K}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        (source / "tokenizer.json").write_text(json.dumps(spec))
        convert(source, tmp_path / f"{split}.gguf", "f16")
        assert fields(tmp_path / f"{split}.gguf")["tokenizer.ggml.pre"] == {"gpt-2": "gpt-2", "o200k": "gpt-4o"}[split]
        hf[split] = [AutoTokenizer.from_pretrained(source)(t, add_special_tokens=False).input_ids for t in SENTENCES]
        vocab = llama_cpp.Llama(str(tmp_path / f"{split}.gguf"), vocab_only=True, verbose=False)
        llm[split] = [vocab.tokenize(t.encode(), add_bos=False, special=True) for t in SENTENCES]
    assert llm == hf
    assert hf["gpt-2"] != hf["o200k"]  # the sentences tell the two splits apart


def test_phimoe_experts_are_stacked_as_llama_cpp_expects(tmp_path):
    """A tiny random Phi-3.5-MoE look-alike. llama.cpp's phimoe runs RMS norm and softmax top-k routing
    where transformers has LayerNorm and sparsemixer, so its logits are not compared, only its layout."""
    half = 16  # rotary dimensions / 2 for head size 32
    source = tiny_phimoe(tmp_path / "phimoe", hidden=128, intermediate=256, mscale=1.243,
                         short_factor=[1.0 + i / 16 for i in range(half)], long_factor=[1.0 + i for i in range(half)])
    assert get("gguf").refuse(json.loads((source / "config.json").read_text())["architectures"][0], "int4",
                              get("gguf").precisions["int4"], {}) is None
    convert(source, tmp_path / "model.gguf", "f32")
    meta = fields(tmp_path / "model.gguf")
    assert meta["general.architecture"] == "phimoe"
    assert (meta["phimoe.expert_count"], meta["phimoe.expert_used_count"]) == (4, 2)
    assert meta["phimoe.rope.scaling.attn_factor"] == pytest.approx(1.243)  # its mscale, as transformers uses
    tensors = meta["tensors"]
    state = load_file(source / "model.safetensors")  # the checkpoint's per-expert tensors, bfloat16
    for hf_name, gguf_name in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
        stacked = np.stack([state[f"model.layers.1.block_sparse_moe.experts.{e}.{hf_name}.weight"].float().numpy()
                            for e in range(4)])
        got = tensors[f"blk.1.{gguf_name}.weight"].data
        assert got.shape == stacked.shape and np.array_equal(got, stacked)
    assert {"output.bias", "blk.0.attn_q.bias", "blk.0.attn_norm.bias", "blk.0.ffn_gate_inp.weight"} <= set(tensors)
    llm = llama(tmp_path / "model.gguf", n_ctx=64, n_threads=2, verbose=False)
    generated = []
    for token in llm.generate(llm.tokenize(b"Hello world"), temp=0.0):
        generated.append(token)
        if len(generated) == 4:
            break
    assert len(generated) == 4


# -- refusals ------------------------------------------------------------------------------------


def test_phi3_small_is_left_out_and_bad_types_are_a_settings_error(tmp_path):
    root = write_project(tmp_path / "small", ["phi3-small-8k"], ["gguf"], ["int4"])
    with pytest.raises(UnsupportedError, match=r"llama\.cpp has no architecture for Phi-3-small"):
        Project.load(root).target("phi3-small-8k-int4-gguf")
    for precision, settings, message in [
        ("int4", 'type = "Q4_K_X"', r"unknown llama.cpp type 'Q4_K_X'; choose one of F32, F16, .*Q4_K_M"),
        ("int8", 'base = "q8_0"\ntype = "Q6_K"', "base q8_0 is already quantized; it builds only type Q8_0, not Q6_K"),
    ]:
        root = write_project(tmp_path / precision, ["phi3-tiny"], ["gguf"], [precision],
                             extra=f"[tool.phibuild.params.gguf.{precision}]\n{settings}\n")
        with pytest.raises(ConfigError, match=f"backend gguf at {precision}: {message}"):
            Project.load(root).target(f"phi3-tiny-{precision}-gguf")


def test_every_offered_type_quantizes_and_loads(built, tmp_path):
    project = Project.load(built[0])
    entry = lock_of(built[0])["phi35-tiny-int4-gguf"]
    converted = project.store.get(entry["intermediate"]["key"]).artifact / "model.gguf"
    constants = {name.removeprefix("LLAMA_FTYPE_MOSTLY_"): value for name, value in vars(llama_cpp).items()
                 if name.startswith("LLAMA_FTYPE_MOSTLY_")} | {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    for kind in TYPES:
        quantize(converted, tmp_path / f"{kind}.gguf", kind, 2)
        assert fields(tmp_path / f"{kind}.gguf")["general.file_type"] == constants[kind]
        llm = llama(tmp_path / f"{kind}.gguf", n_ctx=64, n_threads=2, verbose=False)
        llm.eval(llm.tokenize(b"Hello world"))
