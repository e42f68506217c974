"""MLX backend: real mlx_lm.convert, real mlx-lm runtime (mlx's CPU build here), through doit.

One doit run builds int4 and fp32 of the three embedded models and of a tiny random Phi-3.5-MoE, and the
tests read those artifacts; a second project builds them again (determinism), two more build variants.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import Run, copy_model, lock_of, prompt_for, reference_logits, run_doit, tiny_phimoe, write_project
from mlx_lm import load

from phibuild.backends import SMOKE_MESSAGES, Job
from phibuild.backends import mlx as mlx_backend
from phibuild.backends.mlx import MlxBackend, MlxRuntime, _gpu_arithmetic
from phibuild.catalog import EMBEDDED_DIR, EMBEDDED_TEXT
from phibuild.errors import ConfigError
from phibuild.project import Project

MODELS = [*EMBEDDED_TEXT, "moe-tiny"]
SMOKE = r"ok: [1-8] tokens from a Phi chat prompt: '.*'( \([1-8] of them padding ids past the tokenizer's tokens\))?"
# float32 on both sides, same operations in a different order: logits of size ~10 agree to 1e-5.
TOLERANCE = 1e-4


def doit(root: Path, *args: str) -> Run:
    """run_doit, failing on any network connection: mlx-lm must not reach for the hub."""
    attempts = []

    def connect(*address):
        attempts.append(address)
        raise OSError("no network in a build")

    with mock.patch.object(socket.socket, "connect", side_effect=connect):
        run = run_doit(root, *args)
    assert not attempts, f"the build tried to connect to {attempts}"
    return run


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    """A random Phi-3.5-MoE in float32. Short and long factors are equal so that mlx-lm's LongRoPE (long
    factors at every position) and transformers' agree, and the comparison tests the conversion."""
    factors = [1.0 + i / 16 for i in range(8)]
    moe = tiny_phimoe(tmp_path_factory.mktemp("moe-tiny"), hidden=64, intermediate=128, short_factor=factors,
                      long_factor=factors, mscale=1.2, dtype="float32")
    settings = json.loads((moe / "config.json").read_text())
    assert "rope_scaling" not in settings and "rope_theta" not in settings  # as transformers 5 saves it
    return moe


def build_all(root: Path, moe: Path) -> Path:
    write_project(root, MODELS, ["mlx"], ["int4", "fp32"], local={"moe-tiny": moe})
    run = doit(root, "quantize")
    assert run.code == 0, run.output
    assert sorted(re.findall(r"^phibuild: building (\S+):", run.output, re.MULTILINE)) == sorted(
        f"{m}-{p}-mlx" for m in MODELS for p in ("int4", "fp32"))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, moe) -> Path:
    return build_all(tmp_path_factory.mktemp("mlx"), moe)


@pytest.fixture(scope="module")
def variants(tmp_path_factory, moe) -> Path:
    """phi3-tiny and the MoE with every precision's parameters changed."""
    root = write_project(
        tmp_path_factory.mktemp("variants"), ["phi3-tiny", "moe-tiny"], ["mlx"], ["int4", "int8", "fp16"],
        local={"moe-tiny": moe}, extra=(
            "[tool.phibuild.params.mlx.int4]\ngroup_size = 32\n"
            '[tool.phibuild.params.mlx.int8]\nmode = "mxfp8"\ngroup_size = 32\n'
            '[tool.phibuild.params.mlx.fp16]\ndtype = "bfloat16"\n'))
    run = doit(root, "quantize")
    assert run.code == 0, run.output
    return root


def lock(root: Path) -> dict:
    return lock_of(root)


def artifact(root: Path, target: str) -> Path:
    return root / "build" / target


def tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` from a safetensors header."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return {name: (t["dtype"], t["shape"]) for name, t in header.items() if name != "__metadata__"}


def config(root: Path, target: str) -> dict:
    return json.loads((artifact(root, target) / "config.json").read_text())


def mlx_logits(directory: Path, ids: list[int]) -> np.ndarray:
    model, _ = load(str(directory))
    return np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))


def test_every_target_loads_in_mlx_lm_and_its_smoke_check_is_locked(built):
    entries = lock(built)
    assert sorted(entries) == sorted(f"{m}-{p}-mlx" for m in MODELS for p in ("int4", "fp32"))
    for name, entry in entries.items():
        assert re.fullmatch(SMOKE, entry["smoke"]["result"], re.DOTALL), name
        assert {"mlx", "mlx-lm", "transformers", "tokenizers"} <= set(entry["versions"])
        assert not {"onnxruntime", "llama-cpp-python", "openvino"} & set(entry["versions"])
        files = set(entry["files"])
        assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja"} <= files, name
        assert "README.md" not in files


def test_past_the_cpu_bound_the_smoke_check_generates_one_token_and_says_so(built, monkeypatch):
    # A real-size model on mlx's CPU backend: the embedded int4 stands in, with the bound lowered to zero.
    target = f"{MODELS[0]}-int4-mlx"
    directory = artifact(built, target)
    job = Job(EMBEDDED_DIR / MODELS[0], directory, "int4", {})
    whole = MlxBackend().smoke(directory, job)
    monkeypatch.setattr(mlx_backend, "CPU_SMOKE_BYTES", 0)
    bounded = MlxBackend().smoke(directory, job)
    assert len(whole.tokens) > 1 and len(bounded.tokens) == 1
    assert bounded.detail.startswith("1 tokens from a Phi chat prompt")
    assert "one token: 0.0 GiB of weights on mlx's CPU backend" in bounded.detail
    # The one token is the prompt's argmax as Apple GPUs compute it (the fidelity runtime's logits; with a
    # cache, generate_step sums in another order, so a near-tie may go either way).
    model, tokenizer = load(str(directory))
    prompt = tokenizer.apply_chat_template(SMOKE_MESSAGES, add_generation_prompt=True, tokenize=False)
    last = MlxRuntime(model).logits(tokenizer.encode(prompt, add_special_tokens=False))[-1]
    assert last[bounded.tokens[0]] > last.max() - 1e-3


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_fp32_gives_the_logits_of_transformers(built, model):
    # mlx-lm 0.31 applies LongRoPE's long factors at every position, transformers its short factors below
    # original_max_position_embeddings: the artifact carries the short factors as both, and so matches.
    source = EMBEDDED_DIR / model
    scaling = json.loads((source / "config.json").read_text()).get("rope_scaling")
    ids, reference = reference_logits(source, prompt_for(model))
    directory = artifact(built, f"{model}-fp32-mlx")
    if scaling:
        staged = config(built, f"{model}-fp32-mlx")["rope_scaling"]
        assert staged["long_factor"] == staged["short_factor"] == scaling["short_factor"]
    _, tokenizer = load(str(directory))
    assert tokenizer.encode(prompt_for(model), add_special_tokens=False) == ids
    got = mlx_logits(directory, ids)
    assert np.abs(got - reference).max() < TOLERANCE


def test_fp32_moe_gives_the_logits_of_transformers_under_mlx_lms_routing(built, moe, monkeypatch):
    # mlx-lm routes Phi-3.5-MoE with a softmax over the top-2 gate logits, transformers with sparsemixer.
    import transformers.models.phimoe.modeling_phimoe as phimoe

    def softmax_top_k(scores, jitter_eps, training, top_k=2):
        top, experts = scores.topk(top_k, dim=-1)
        return torch.softmax(top, dim=-1), experts

    monkeypatch.setattr(phimoe, "sparsemixer", softmax_top_k)
    ids, reference = reference_logits(moe)
    assert np.abs(mlx_logits(artifact(built, "moe-tiny-fp32-mlx"), ids) - reference).max() < TOLERANCE
    settings = config(built, "moe-tiny-fp32-mlx")
    assert settings["rope_theta"] == 1e6 and settings["rope_scaling"]["type"] == "longrope"


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_int4_records_bits_and_group_size_and_packs_the_weights(built, model):
    target = f"{model}-int4-mlx"
    settings = config(built, target)
    assert settings["quantization"] == settings["quantization_config"] == {"group_size": 64, "bits": 4,
                                                                           "mode": "affine"}
    hidden, inner, vocab = settings["hidden_size"], settings["intermediate_size"], settings["vocab_size"]
    layout = tensors(artifact(built, target) / "model.safetensors")
    # down_proj: hidden outputs of inner inputs; 4 bits pack 8 to a uint32, 64 inputs share a scale and bias.
    assert layout["model.layers.0.mlp.down_proj.weight"] == ("U32", [hidden, inner * 4 // 32])
    assert layout["model.layers.0.mlp.down_proj.scales"] == ("BF16", [hidden, inner // 64])
    assert layout["model.layers.0.mlp.down_proj.biases"] == ("BF16", [hidden, inner // 64])
    assert layout["model.embed_tokens.weight"] == ("U32", [vocab, hidden * 4 // 32])
    assert ("lm_head.weight" in layout) == (not settings["tie_word_embeddings"])
    assert not [name for name, (dtype, _) in layout.items() if name.endswith("proj.weight") and dtype != "U32"]


def test_int4_moe_packs_every_expert(built):
    layout = tensors(artifact(built, "moe-tiny-int4-mlx") / "model.safetensors")
    # 4 experts stacked; gate/up: 128 outputs of 64 inputs, down: 64 outputs of 128 inputs.
    assert layout["model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight"] == ("U32", [4, 128, 8])
    assert layout["model.layers.0.block_sparse_moe.switch_mlp.down_proj.weight"] == ("U32", [4, 64, 16])
    assert layout["model.layers.0.block_sparse_moe.switch_mlp.down_proj.scales"] == ("F32", [4, 64, 2])


def test_parameters_enter_the_key_and_the_artifact(built, variants):
    default, changed = lock(built)["phi3-tiny-int4-mlx"], lock(variants)["phi3-tiny-int4-mlx"]
    assert changed["params"]["group_size"] == 32 and changed["key"] != default["key"]
    assert config(variants, "phi3-tiny-int4-mlx")["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    layout = tensors(artifact(variants, "phi3-tiny-int4-mlx") / "model.safetensors")
    assert layout["model.layers.0.mlp.down_proj.scales"] == ("BF16", [256, 512 // 32])

    assert config(variants, "phi3-tiny-int8-mlx")["quantization"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    layout = tensors(artifact(variants, "phi3-tiny-int8-mlx") / "model.safetensors")
    assert layout["model.layers.0.mlp.down_proj.weight"] == ("U32", [256, 512 * 8 // 32])
    assert "model.layers.0.mlp.down_proj.biases" not in layout  # float formats have a shared exponent only

    layout = tensors(artifact(variants, "phi3-tiny-fp16-mlx") / "model.safetensors")
    assert {dtype for dtype, _ in layout.values()} == {"BF16"}
    smoke = {name: entry["smoke"]["result"] for name, entry in lock(variants).items()}
    assert smoke.pop("moe-tiny-fp16-mlx") == (
        "not run: unquantized mixture-of-experts layers in 16 bits run on a GPU only (mlx's CPU gather_mm is "
        "float32-only); this check runs on Apple silicon")
    assert len(smoke) == 5 and all(re.fullmatch(SMOKE, text, re.DOTALL) for text in smoke.values())


def test_mixed_recipe_gives_layers_their_own_bits(tmp_path):
    root = write_project(tmp_path, ["phi3-tiny"], ["mlx"], ["int4"],
                         extra='[tool.phibuild.params.mlx.int4]\nrecipe = "mixed_3_6"\n')
    run = run_doit(root, "quantize")
    assert run.code == 0, run.output
    quantization = config(root, "phi3-tiny-int4-mlx")["quantization"]
    # Of two layers the last gets 6 bits in down_proj and in v_proj (which qkv_proj's name contains), as
    # does the LM head; the rest get 3.
    high = {"model.layers.1.mlp.down_proj", "model.layers.1.self_attn.qkv_proj", "lm_head"}
    bits = {path: entry["bits"] for path, entry in quantization.items() if isinstance(entry, dict)}
    assert bits == {path: 6 if path in high else 3 for path in bits}
    assert len(bits) == 1 + 2 * 4 + 1  # embeddings, qkv/o/gate_up/down per layer, LM head
    layout = tensors(artifact(root, "phi3-tiny-int4-mlx") / "model.safetensors")
    assert layout["model.layers.1.mlp.down_proj.weight"] == ("U32", [256, 512 * 6 // 32])
    assert layout["model.layers.0.mlp.down_proj.weight"] == ("U32", [256, 512 * 3 // 32])


def test_two_projects_build_the_same_bytes(built, moe, tmp_path_factory):
    again = build_all(tmp_path_factory.mktemp("mlx-again"), moe)
    first, second = lock(built), lock(again)
    for name in first:
        assert second[name]["key"] == first[name]["key"], name
        assert second[name]["files"] == first[name]["files"], name
        assert second[name]["smoke"] == first[name]["smoke"], name


def tiny_phi3small(directory: Path) -> Path:
    """A random Phi-3-small look-alike in the hub checkpoint's layout: phi3small's config keys and weight names
    (fused query_key_value, the GeGeLU MLP, LayerNorms and linear layers with biases, blocksparse attention
    every other layer, muP scaling, tied embeddings), at the real vocabulary size (mlx-lm masks the dummy token
    ids 100256 and up, where mlx-lm before 0.32.2 wrote out of bounds), with phi4-mini-tiny's byte-level BPE
    tokenizer."""
    from safetensors.torch import save_file

    hidden, heads, kv_heads, intermediate, layers, vocab = 256, 4, 2, 512, 2, 100352
    generator = torch.Generator().manual_seed(0)

    def weight(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    def norm(prefix):
        return {f"{prefix}.weight": torch.ones(hidden, dtype=torch.bfloat16),
                f"{prefix}.bias": torch.zeros(hidden, dtype=torch.bfloat16)}

    tensors = {"model.embed_tokens.weight": weight(vocab, hidden), **norm("model.final_layernorm")}
    for index in range(layers):
        layer = f"model.layers.{index}"
        for name, (rows, columns) in {"self_attn.query_key_value": ((heads + 2 * kv_heads) * hidden // heads, hidden),
                                      "self_attn.dense": (hidden, hidden), "mlp.up_proj": (2 * intermediate, hidden),
                                      "mlp.down_proj": (hidden, intermediate)}.items():
            tensors[f"{layer}.{name}.weight"], tensors[f"{layer}.{name}.bias"] = weight(rows, columns), weight(rows)
        tensors.update(norm(f"{layer}.input_layernorm"), **norm(f"{layer}.post_attention_layernorm"))
    directory.mkdir(parents=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    tokenizer = EMBEDDED_DIR / "phi4-mini-tiny"
    base = json.loads((tokenizer / "config.json").read_text())
    config = {"architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small", "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "ff_intermediate_size": intermediate, "gegelu_limit": 20.0, "dense_attention_every_n_layers": 2,
              "layer_norm_epsilon": 1e-5, "vocab_size": vocab, "max_position_embeddings": 8192,
              "rope_embedding_base": 1000000, "rope_position_scale": 1.0, "mup_attn_multiplier": 1.0,
              "mup_embedding_multiplier": 10.0, "mup_use_scaling": True, "mup_width_multiplier": 8.0,
              "blocksparse_block_size": 64, "blocksparse_num_local_blocks": 16, "blocksparse_vert_stride": 8,
              "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": base["bos_token_id"],
              "eos_token_id": base["eos_token_id"]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (directory / name).write_bytes((tokenizer / name).read_bytes())
    return directory


def test_phi3_small_builds_and_runs_on_mlx_lm(tmp_path):
    """mlx-lm 0.32.2, the mlx toolchain's release, runs Phi-3-small (0.31 crashed on it, so it was refused)."""
    small = tiny_phi3small(tmp_path / "small")
    root = write_project(tmp_path / "p", ["small"], ["mlx"], ["int4", "fp16"], local={"small": small})
    run = run_doit(root)
    assert run.code == 0, run.output
    for precision in ("int4", "fp16"):
        smoke = lock_of(root)[f"small-{precision}-mlx"]["smoke"]["result"]
        assert smoke.startswith("ok: 8 tokens from a Phi chat prompt"), smoke
    assert "left out" not in run_doit(write_project(tmp_path / "hub", ["phi3-small-8k"], ["mlx"], ["int4"]),
                                      "list").output


@pytest.mark.parametrize(("model", "precision", "params", "reason"), [
    ("phi3-tiny", "int4", 'mode = "mxfp4"', r"mode mxfp4 is 4 bits in groups of 32: use it at int4 with bits = 4 "
                                            r"and group_size = 32"),
    ("phi3-tiny", "int4", "group_size = 256", r"group_size must be 32, 64 or 128 for affine quantization, not 256"),
    ("phi3-tiny", "int4", "bits = 8", r"bits at int4 must be one of 2, 3, 4, 5, 6, not 8"),
    ("phi3-tiny", "int8", 'recipe = "mixed_3_6"', r"recipe mixed_3_6 \(3 and 6 bits\) is affine quantization at "
                                                  r"int4 only"),
    ("phi3-tiny", "int4", 'recipe = "mixed_3_6"\nbits = 3', r"recipe mixed_3_6 gives each layer 3 or 6 bits itself"),
    ("phi3-tiny", "fp32", 'dtype = "float16"', r"dtype at fp32 must be one of float32, not 'float16'"),
])
def test_parameters_mlx_lm_cannot_use_are_a_settings_error(tmp_path, model, precision, params, reason):
    root = write_project(tmp_path, [model], ["mlx"], [precision],
                         extra=f"[tool.phibuild.params.mlx.{precision}]\n{params}\n")
    with pytest.raises(ConfigError, match=f"backend mlx at {precision}: {reason}"):
        Project.load(root).target(f"{model}-{precision}-mlx")


def test_other_architectures_are_left_out_of_the_task_list(tmp_path):
    phi2 = copy_model("phi3-tiny", tmp_path / "phi2")
    settings = json.loads((phi2 / "config.json").read_text())
    (phi2 / "config.json").write_text(json.dumps({**settings, "architectures": ["PhiForCausalLM"]}))
    root = write_project(tmp_path / "project", ["phi2"], ["mlx"], ["int4"], local={"phi2": phi2})
    run = run_doit(root, "list")
    assert run.code == 0
    assert ("left out: phi2 (mlx at int4: MLX (mlx-lm) builds Phi3ForCausalLM, Phi3SmallForCausalLM, "
            "PhiMoEForCausalLM, PhimoeForCausalLM, not PhiForCausalLM)") in run.output


@pytest.mark.parametrize(("mode", "bits", "group_size"), [("affine", 4, 64), ("affine", 8, 64), ("mxfp4", 4, 32),
                                                          ("mxfp8", 8, 32)])
def test_fidelity_multiplies_quantized_weights_as_mlx_in_float32_and_rounds_once(mode, bits, group_size):
    """The fidelity step's quantized matmul (as mlx's GPU kernels compute it) is mlx's own where mlx's CPU kernel
    sums in float32; with 16-bit activations, the only error left is the output's rounding to 16 bits."""
    rng = np.random.default_rng(0)
    weights = mx.array(rng.normal(size=(96, 256)).astype(np.float32) * 0.05)
    inputs = rng.normal(size=(8, 256)).astype(np.float32)
    for dtype, ulp in ((mx.float32, 2.0**-23), (mx.float16, 2.0**-10), (mx.bfloat16, 2.0**-7)):
        packed = mx.quantize(weights.astype(dtype), group_size=group_size, bits=bits, mode=mode)
        args = dict(group_size=group_size, bits=bits, mode=mode)
        biases = packed[2] if len(packed) > 2 else None
        x = mx.array(inputs).astype(dtype)
        with _gpu_arithmetic(True):
            ours = np.array(mx.quantized_matmul(x, packed[0], packed[1], biases, **args).astype(mx.float32))
        # scale * q + bias in float32, as the GPU kernels compute it (the float formats' scales are exact)
        scales, shifts = (packed[1], None) if biases is None else (packed[1].astype(mx.float32),
                                                                  biases.astype(mx.float32))
        dequantized = np.array(mx.dequantize(packed[0], scales, shifts, dtype=mx.float32, **args), np.float64)
        exact = np.array(x.astype(mx.float32), np.float64) @ dequantized.T
        assert np.all(np.abs(ours - exact) <= ulp / 2 * np.abs(exact) + 1e-5), dtype  # + float32 sums
        if dtype == mx.float32:
            kernel = np.array(mx.quantized_matmul(x, packed[0], packed[1], biases, **args))
            np.testing.assert_allclose(ours, kernel, rtol=1e-5, atol=1e-5)
