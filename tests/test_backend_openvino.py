"""The OpenVINO backend, built through doit in throwaway projects (about 90 s on two cores).

One module-scoped project builds what most tests read: every embedded model and a tiny PhiMoE (random
weights, written here) at fp32, and phi35-tiny at int4 and int8. Two more projects build a few targets again
(reproducibility) and with overridden int4 parameters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    assert_same_choice,
    copy_model,
    greedy_agreement,
    lock_of,
    reference_logits,
    run_doit,
    tiny_phimoe,
    write_project,
)

from phibuild.backends import SMOKE_MESSAGES, SMOKE_TOKENS, Job, get
from phibuild.backends.openvino import OpenvinoRuntime
from phibuild.catalog import EMBEDDED_DIR, EMBEDDED_TEXT
from phibuild.errors import ConfigError, UnsupportedError
from phibuild.project import Project

FP32 = [f"{model}-fp32-openvino" for model in [*EMBEDDED_TEXT, "phimoe-tiny"]]
QUANTIZED = ["phi35-tiny-int4-openvino", "phi35-tiny-int8-openvino"]
# fp32 IR against transformers in float32, on the same token ids: measured differences are below 1e-5.
LOGIT_ATOL = 1e-4


@dataclass(frozen=True)
class Compressed:
    """A weight NNCF compressed: its stored element type and shape, its scale's shape, and a zero point or not."""

    type: str
    shape: tuple[int, ...]
    scale: tuple[int, ...]
    zero_point: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def compressed_weights(xml: Path) -> dict[str, Compressed]:
    """Every compressed weight of an IR, by constant name.

    NNCF stores one as an integer Constant, decompressed by Convert, an optional Subtract of the zero point
    and a Multiply by the scale Constant; that subgraph is what is read back here.
    """
    import openvino

    found = {}
    for op in openvino.Core().read_model(xml).get_ordered_ops():
        if op.get_type_name() != "Multiply":
            continue
        data, scale = (port.get_source_output().get_node() for port in op.inputs())
        if scale.get_type_name() != "Constant":
            data, scale = scale, data
        zero_point = data.get_type_name() == "Subtract"
        if zero_point:
            data = data.input_value(0).get_node()
        if scale.get_type_name() != "Constant" or data.get_type_name() != "Convert":
            continue
        weight = data.input_value(0).get_node()
        if weight.get_type_name() == "Constant" and weight.get_output_element_type(0).is_integral():
            found[weight.get_friendly_name()] = Compressed(weight.get_output_element_type(0).to_string(),
                                                           tuple(weight.shape), tuple(scale.shape), zero_point)
    return found


def split(weights: dict[str, Compressed]) -> tuple[list[Compressed], list[Compressed]]:
    """(decoder layer weights, whose share in int4 the ratio sets; embeddings and lm_head, kept in backup)."""
    edges = [w for name, w in weights.items() if "embed_tokens" in name or "lm_head" in name]
    layers = [w for name, w in weights.items() if "embed_tokens" not in name and "lm_head" not in name]
    return layers, edges


def ir_logits(artifact: Path, ids: list[int]) -> np.ndarray:
    """Next-token logits of the IR on ``ids``, computed in f32 (the CPU plugin may pick bf16 otherwise): the
    fidelity runtime's inputs (``_inputs``) on a model compiled with another precision hint."""
    import openvino

    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    return OpenvinoRuntime(openvino.Core().compile_model(artifact / "openvino_model.xml", "CPU", f32)).logits(ids)[-1]


def model_table(name: str, path: Path) -> str:
    return f'[tool.phibuild.model.{name}]\npath = "{path.as_posix()}"\n'


@pytest.fixture(scope="module")
def phimoe(tmp_path_factory) -> Path:
    rope = json.loads((EMBEDDED_DIR / "phi35-tiny" / "config.json").read_text())["rope_scaling"]
    return tiny_phimoe(tmp_path_factory.mktemp("models") / "phimoe-tiny", hidden=256, intermediate=256,
                       short_factor=rope["short_factor"], long_factor=rope["long_factor"], mscale=1.243163121016122)


@pytest.fixture(scope="module")
def built(tmp_path_factory, phimoe) -> Path:
    """A project in which FP32 and QUANTIZED were built by `doit quantize:...`."""
    root = write_project(tmp_path_factory.mktemp("main"), models=[*EMBEDDED_TEXT, "phimoe-tiny"],
                         backends=["openvino"], precisions=["fp32", "int4", "int8"],
                         extra=model_table("phimoe-tiny", phimoe))
    run = run_doit(root, *(f"quantize:{name}" for name in FP32 + QUANTIZED))
    assert run.code == 0
    return root


def source_of(name: str, phimoe: Path) -> Path:
    return phimoe if name == "phimoe-tiny" else EMBEDDED_DIR / name


def test_each_target_is_built_and_smoke_checked(built):
    lock = lock_of(built)
    for name in FP32 + QUANTIZED:
        entry = lock.get(name)
        assert entry is not None, f"{name} not in artifacts.lock"
        smoke = entry["smoke"]["result"]
        assert re.match(r"ok: [1-9]\d* tokens from a Phi chat prompt: ", smoke), smoke
        for required in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml",
                         "openvino_detokenizer.xml"):
            assert required in entry["files"]
            assert (built / "build" / name / required).is_file()
        assert {"openvino", "nncf", "optimum-intel", "openvino-tokenizers", "transformers"} <= set(entry["versions"])
    assert lock.get("phi35-tiny-int4-openvino")["params"] == get("openvino").precisions["int4"]


@pytest.mark.parametrize("model", [*EMBEDDED_TEXT, "phimoe-tiny"])
def test_fp32_logits_match_transformers(built, phimoe, model):
    ids, expected = reference_logits(source_of(model, phimoe))
    logits = ir_logits(built / "build" / f"{model}-fp32-openvino", ids)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("model", [*EMBEDDED_TEXT, "phimoe-tiny"])
def test_smoke_check_generates_what_transformers_does(built, phimoe, model):
    """The exported tokenizer IR, its chat template and greedy decoding agree with transformers: the prompt the
    pipeline tokenizes is the one transformers' chat template makes, and each token it picks is transformers'
    choice wherever that choice is clear (the pipeline may run in bf16 on CPUs that have it)."""
    from transformers import AutoTokenizer

    source = source_of(model, phimoe)
    tokenizer = AutoTokenizer.from_pretrained(source)
    prompt = tokenizer.apply_chat_template(SMOKE_MESSAGES, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    artifact = built / "build" / f"{model}-fp32-openvino"
    smoke = get("openvino").smoke(artifact, Job(source, artifact, "fp32", {}))
    assert smoke.ran and len(smoke.tokens) == SMOKE_TOKENS
    assert greedy_agreement(source, prompt, list(smoke.tokens)) >= SMOKE_TOKENS // 2


def test_int4_layout_follows_the_parameters(built):
    """Default int4: int4_sym in groups of 128 for at most 60% of the layer weights, int8_asym for the rest."""
    import openvino

    artifact = built / "build" / "phi35-tiny-int4-openvino"
    layers, edges = split(compressed_weights(artifact / "openvino_model.xml"))
    assert len(layers) == 8 and len(edges) == 2  # qkv, o, gate_up, down in 2 layers; embeddings and lm_head
    int4 = [w for w in layers if w.type == "i4"]
    backup = [w for w in layers + edges if w.type == "u8"]
    assert len(int4) + len(backup) == len(layers) + len(edges)
    assert all(w.type == "u8" for w in edges)
    share = sum(w.size for w in int4) / sum(w.size for w in layers)
    assert 0 < share <= 0.6, f"{share:.0%} of the layer weights are int4 with ratio 0.6"
    for weight in int4:  # (rows, groups, 128), one scale per group, symmetric: no zero point
        assert weight.shape[-1] == 128 and weight.scale == (*weight.shape[:-1], 1) and not weight.zero_point
    for weight in backup:  # per channel, asymmetric
        assert len(weight.shape) == 2 and weight.scale == (weight.shape[0], 1) and weight.zero_point
    model = openvino.Core().read_model(artifact / "openvino_model.xml")
    recorded = {key: model.get_rt_info(["nncf", "weight_compression", key]).astype(str)
                for key in ("mode", "group_size", "ratio", "backup_mode")}
    assert recorded == {"mode": "int4_sym", "group_size": "128", "ratio": "0.6", "backup_mode": "int8_asym"}
    # Still the same model: next-token logits point the same way as the checkpoint's.
    ids, expected = reference_logits(EMBEDDED_DIR / "phi35-tiny")
    logits = ir_logits(artifact, ids)
    assert np.dot(logits, expected) / np.linalg.norm(logits) / np.linalg.norm(expected) > 0.999
    assert_same_choice(logits, expected)


def test_int8_layout_is_per_channel_asymmetric(built):
    artifact = built / "build" / "phi35-tiny-int8-openvino"
    weights = compressed_weights(artifact / "openvino_model.xml")
    assert len(weights) == 10
    for weight in weights.values():
        assert weight.type == "u8" and len(weight.shape) == 2
        assert weight.scale == (weight.shape[0], 1) and weight.zero_point
    ids, expected = reference_logits(EMBEDDED_DIR / "phi35-tiny")
    np.testing.assert_allclose(ir_logits(artifact, ids), expected, rtol=0, atol=0.05)


def test_builds_are_byte_identical_across_projects(built, tmp_path):
    """A second project (its own store and build directories) builds the same keys into the same bytes."""
    name = "phi35-tiny-int4-openvino"  # the export, the tokenizer conversion and NNCF: every step fp32 has
    root = write_project(tmp_path / "again", models=["phi35-tiny"], backends=["openvino"], precisions=["int4"])
    run = run_doit(root, f"quantize:{name}")
    assert run.code == 0 and run.built == [name]
    first, second = lock_of(built)[name], lock_of(root)[name]
    assert second["key"] == first["key"]
    assert second["files"] == first["files"]
    for path in (built / "build" / name).iterdir():
        assert path.read_bytes() == (root / "build" / name / path.name).read_bytes(), path.name


def test_int4_parameters_and_fp16(tmp_path):
    """Overridden int4 parameters reach NNCF (optimum-intel's Phi recipe: asymmetric, groups of 64, ratio 1,
    data-free AWQ); fp16 stores f16 weights."""
    import openvino

    root = write_project(tmp_path / "params", models=["phi4-mini-tiny"], backends=["openvino"],
                         precisions=["int4", "fp16"],
                         extra="[tool.phibuild.params.openvino.int4]\nsym = false\ngroup_size = 64\nratio = 1.0\n"
                               "awq = true\n")
    assert run_doit(root, "quantize").code == 0
    int4 = root / "build" / "phi4-mini-tiny-int4-openvino" / "openvino_model.xml"
    layers, edges = split(compressed_weights(int4))
    assert len(layers) == 8 and len(edges) == 1  # tied embeddings: one matrix for embed_tokens and lm_head
    for weight in layers:
        assert weight.type == "u4" and weight.shape[-1] == 64 and weight.zero_point
        assert weight.scale == (*weight.shape[:-1], 1)
    assert edges[0].type == "u8"
    assert openvino.Core().read_model(int4).get_rt_info(["nncf", "weight_compression", "awq"]).astype(str) == "True"

    fp16 = root / "build" / "phi4-mini-tiny-fp16-openvino"
    assert not compressed_weights(fp16 / "openvino_model.xml")
    model = openvino.Core().read_model(fp16 / "openvino_model.xml")
    matrices = [op for op in model.get_ops() if op.get_type_name() == "Constant" and len(op.shape) == 2
                and op.shape[1] == 256]
    assert matrices and all(op.get_output_element_type(0).to_string() == "f16" for op in matrices)
    rotary = {op.get_friendly_name(): op.get_output_element_type(0).to_string() for op in model.get_ordered_ops()
              if op.get_type_name() == "Constant" and "rotary_emb" in op.get_friendly_name()
              and op.get_output_element_type(0).is_real()}  # the frequencies, LongRoPE's factors: kept in f32
    assert len(rotary) >= 2 and set(rotary.values()) == {"f32"}, rotary
    ids, expected = reference_logits(EMBEDDED_DIR / "phi4-mini-tiny")
    np.testing.assert_allclose(ir_logits(fp16, ids), expected, rtol=0, atol=0.01)


def test_phi3_small_is_refused(tmp_path):
    small = copy_model("phi3-tiny", tmp_path / "small")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "architectures": ["Phi3SmallForCausalLM"]}))
    root = write_project(tmp_path / "project", models=["phi3-small-local", "phi3-small-8k"], backends=["openvino"],
                         precisions=["int4"], extra=model_table("phi3-small-local", small))
    with pytest.raises(UnsupportedError, match="no OpenVINO export for Phi-3-small"):
        Project.load(root).target("phi3-small-local-int4-openvino")
    found, skipped = Project.load(root).targets()
    assert not found
    assert any(note.name == "phi3-small-8k-int4-openvino" for note in skipped)  # known without a download
    run = run_doit(root, "list")
    assert run.code == 0 and "left out: phi3-small-local (openvino at int4: " in run.output
    assert "; phi3-small-8k (openvino at int4: " in run.output


@pytest.mark.parametrize(("precision", "override", "message"), [
    ("int4", {"group_size": 0}, "group_size"),
    ("int4", {"ratio": 1.5}, "ratio"),
    ("int4", {"backup_precision": "int2"}, "backup_precision"),
    ("int8", {"sym": "yes"}, "sym"),
    ("int4", {"awq": 1}, "awq"),
])
def test_bad_parameters_are_refused(precision, override, message):
    with pytest.raises(ConfigError, match=f"backend openvino at {precision}: {message}"):
        get("openvino").params(precision, override)
