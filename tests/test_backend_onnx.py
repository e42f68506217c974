"""ONNX Runtime GenAI backend: real builder, real runtime, on every embedded model.

One doit run builds every precision of the three embedded models; the tests read those artifacts.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
from conftest import HOME, lock_of, prompt_for, reference_logits, run_doit, write_project
from transformers import AutoTokenizer

from phibuild.backends import Job
from phibuild.backends import onnx as onnx_backend
from phibuild.backends.onnx import builder as onnx_builder
from phibuild.backends.onnx import quantize as onnx_quantize
from phibuild.catalog import EMBEDDED_DIR, EMBEDDED_TEXT
from phibuild.errors import ConfigError, UnsupportedError
from phibuild.project import Project

SENTENCES = ["Return the absolute path of a file.", "os.path.join('a', 'b') == 'a/b' # 42 ok?\n", "Tab\tand\nnewline"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = write_project(tmp_path_factory.mktemp("onnx"), EMBEDDED_TEXT, ["onnx"], ["int4", "int8", "fp16", "fp32"])
    run = run_doit(root)
    assert run.code == 0
    return root


def onnx_logits(artifact: Path, ids: list[int]) -> np.ndarray:
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    return np.array(generator.get_output("logits"))[0, -1]


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_fp32_gives_the_logits_of_transformers(built, model):
    ids, reference = reference_logits(EMBEDDED_DIR / model, prompt_for(model))
    got = onnx_logits(built / "build" / f"{model}-fp32-onnx", ids)
    # float32 both sides; the fused attention and layer norms reorder sums: 1e-3 of logits of size ~10.
    assert np.abs(got - reference).max() < 1e-3


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_int4_is_matmulnbits_with_the_asked_block_size_and_measurably_lossy(built, model):
    artifact = built / "build" / f"{model}-int4-onnx"
    graph = onnx.load(artifact / "model.onnx").graph
    quantized = [n for n in graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in quantized]
    assert len(quantized) >= 4 * 2  # qkv, o, gate, up, down per layer (the LM head too unless tied)
    assert {(a["bits"], a["block_size"]) for a in attrs} == {(4, 32)}
    assert not [n for n in graph.node if n.op_type == "MatMul" and "proj" in n.name]

    ids, reference = reference_logits(EMBEDDED_DIR / model, prompt_for(model))
    error = np.abs(onnx_logits(artifact, ids) - reference).max()
    assert 1e-3 < error < 0.25 * np.abs(reference).max()


def test_int8_is_8_bit_matmulnbits(built):
    graph = onnx.load(built / "build" / "phi35-tiny-int8-onnx" / "model.onnx").graph
    bits = {onnx.helper.get_attribute_value(a) for n in graph.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"}
    assert bits == {8}


def test_fp16_is_built_for_cuda_and_its_smoke_check_says_it_did_not_run(built):
    entry = lock_of(built)["phi3-tiny-fp16-onnx"]
    assert entry["params"]["execution_provider"] == "cuda"
    assert entry["smoke"]["result"] == "not run: built for the cuda execution provider; this check runs on the CPU only"
    config = json.loads((built / "build" / "phi3-tiny-fp16-onnx" / "genai_config.json").read_text())
    assert "cuda" in json.dumps(config["model"]["decoder"]["session_options"]["provider_options"])


@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_artifact_tokenizer_matches_the_models_own(built, model):
    tokenizer = og.Tokenizer(og.Model(str(built / "build" / f"{model}-int4-onnx")))
    reference = AutoTokenizer.from_pretrained(EMBEDDED_DIR / model)
    for text in [*SENTENCES, prompt_for(model)]:
        assert [int(i) for i in tokenizer.encode(text)] == reference(text, add_special_tokens=False).input_ids
    # ONNX Runtime GenAI's decoder keeps the space SentencePiece's dummy prefix stands for (Hugging Face strips it).
    dummy_prefix = "" if model.startswith("phi4") else " "
    for text in SENTENCES:
        assert tokenizer.decode(tokenizer.encode(text)) == dummy_prefix + text


def test_runs_of_spaces_are_split_differently_from_sentencepiece(built):
    """A known upstream difference, recorded here so that a fix shows up: ONNX Runtime GenAI's tokenizer
    gives each space of a run its own piece where SentencePiece (and Hugging Face) use the "▁▁" piece."""
    tokenizer = og.Tokenizer(og.Model(str(built / "build" / "phi3-tiny-int4-onnx")))
    reference = AutoTokenizer.from_pretrained(EMBEDDED_DIR / "phi3-tiny")
    ids = [int(i) for i in tokenizer.encode("a  b")]
    assert reference.convert_ids_to_tokens(ids) == ["▁a", "▁", "▁b"]
    assert reference.tokenize("a  b") == ["▁a", "▁▁", "b"]


def test_smoke_checks_ran_and_are_recorded(built):
    lock = lock_of(built)
    cpu = [name for name, entry in lock.items() if entry["params"]["execution_provider"] == "cpu"]
    assert len(cpu) == 9
    for name in cpu:
        assert re.fullmatch(r"ok: [1-8] tokens from a Phi chat prompt: '.*'", lock[name]["smoke"]["result"], re.DOTALL)


def test_onnx_runtime_writes_no_event_database_when_telemetry_is_off(built):
    """The opt-out the README names: with ORT_DISABLE_TELEMETRY=1 (set by conftest for the whole suite),
    building and running these models left no device id or event database under the home directory."""
    assert not (Path(HOME) / ".cache" / "Microsoft").exists()


def test_unsupported_pairs_are_refused_with_the_reason(tmp_path):
    root = write_project(tmp_path, ["phi3-tiny"], ["onnx"], ["fp16"],
                         extra='[tool.phibuild.params.onnx.fp16]\nexecution_provider = "cpu"\n')
    project = Project.load(root)
    with pytest.raises(ConfigError, match=r"onnx at fp16: .* builds fp16 for execution providers cuda, dml, not 'cpu'"):
        project.target("phi3-tiny-fp16-onnx")
    root = write_project(tmp_path / "moe", ["phi35-moe"], ["onnx"], ["int4"])
    with pytest.raises(UnsupportedError, match=r"its PhiMoE operator is CUDA-only: int4 with "
                                               r"execution_provider = \"cuda\""):
        Project.load(root).target("phi35-moe-int4-onnx")


@pytest.mark.parametrize("precision", ["int4", "int8"])
@pytest.mark.parametrize("model", EMBEDDED_TEXT)
def test_one_weight_at_a_time_writes_the_builders_own_bytes(tmp_path, monkeypatch, model, precision):
    # phibuild quantizes node by node to keep real-size builds small (backends/onnx/quantize.py); the bytes must be
    # those of the builder's whole-model to_nbits, which runs when the replacement is switched off.
    streamed = []
    monkeypatch.setattr(onnx_quantize, "streamed_nbits",
                        lambda builder, real=onnx_quantize.streamed_nbits: streamed.append(1) or real(builder))
    outputs = {}
    for way in ("streamed", "whole"):
        if way == "whole":
            monkeypatch.setattr(onnx_builder, "one_weight_at_a_time", lambda cls: contextlib.nullcontext())
        outputs[way] = tmp_path / way
        outputs[way].mkdir()
        onnx_backend.OnnxBackend().build(Job(EMBEDDED_DIR / model, outputs[way], precision,
                                             dict(onnx_backend.QUANTIZED)))
    assert streamed == [1]
    names = sorted(path.name for path in outputs["whole"].iterdir())
    assert names == sorted(path.name for path in outputs["streamed"].iterdir())
    assert {"model.onnx", "model.onnx.data"} <= set(names)
    for name in names:
        assert (outputs["streamed"] / name).read_bytes() == (outputs["whole"] / name).read_bytes(), name


def test_a_quantization_it_does_not_reproduce_runs_the_builders_own(tmp_path, monkeypatch):
    streamed = []
    monkeypatch.setattr(onnx_quantize, "streamed_nbits", lambda builder: streamed.append(1))
    params = dict(onnx_backend.QUANTIZED, algo_config="k_quant")
    onnx_backend.OnnxBackend().build(Job(EMBEDDED_DIR / "phi3-tiny", tmp_path, "int4", params))
    assert not streamed
    graph = onnx.load(tmp_path / "model.onnx").graph
    assert [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert not [n for n in graph.node if n.op_type == "MatMul" and "proj" in n.name]


@pytest.mark.parametrize("size", [(64, 48), (448, 448), (900, 500), (300, 1000), (1500, 200), (2900, 2700)])
def test_vision_and_embedding_modules_give_transformers_image_embeddings(size, tmp_path):
    """phibuild's image embedding for ONNX Runtime GenAI (backends/onnx/vision.py's modules, exported to vision.onnx and
    embedding.onnx), run in torch on transformers' own preprocessing of an image of each crop layout, from one crop
    to 36, padded at the bottom or the right: transformers' embeddings of the whole prompt."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoProcessor

    from phibuild.backends import image_prompt
    from phibuild.backends.onnx import vision as onnx_vision

    source = EMBEDDED_DIR / "phi4-multimodal-tiny"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()
    config = model.config.vision_config
    pixels = np.random.default_rng(sum(size)).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)  # no white
    Image.fromarray(pixels).save(tmp_path / "image.png")
    inputs = image_prompt.inputs(AutoProcessor.from_pretrained(source), tmp_path / "image.png")
    ids = inputs["input_ids"]
    vision = onnx_vision._Vision(model.model.embed_tokens_extend.image_embed, config.feature_layer,
                                 AutoImageProcessor.from_pretrained(source)).eval()
    embedding = onnx_vision._Embedding(model.model.embed_tokens, config.image_token_id).eval()
    with torch.no_grad():
        expected = model.model.embed_tokens_extend.image_embed(
            ids, model.model.embed_tokens(ids), image_pixel_values=inputs["image_pixel_values"],
            image_sizes=inputs["image_sizes"], image_attention_mask=inputs["image_attention_mask"])
        count = (ids == config.image_token_id).sum().reshape(1, 1)
        got = embedding(ids, vision(inputs["image_pixel_values"], inputs["image_sizes"], count))
    assert inputs["image_pixel_values"].shape[1] > 1
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-3)


def test_a_weight_over_protobufs_limit_is_refused_with_the_reason(tmp_path, monkeypatch):
    """A single weight over 2 GiB in float32 (Phi-4-mini's tied output head, 2.46 GB) cannot be handed to the
    quantizer in a model of its own: the build says so, naming the weight, instead of protobuf's EncodeError."""
    from phibuild.errors import BuildError

    monkeypatch.setattr(onnx_quantize, "PROTOBUF_LIMIT", 256 * 1088 * 4 - 1)  # the output head, and nothing smaller
    params = onnx_backend.OnnxBackend().params("int4", {})
    with pytest.raises(BuildError, match=r"the weight \S+ is 0\.00 GB in float32, over protobuf's 2 GiB limit"):
        onnx_backend.OnnxBackend().build(Job(EMBEDDED_DIR / "phi3-tiny", tmp_path, "int4", params))
