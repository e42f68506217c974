"""Bad input gets one clear message, and nothing is written to the store or the lock."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from conftest import copy_model, run_doit, write_project

from phibuild.errors import PhibuildError
from phibuild.project import Project


def assert_nothing_written(root: Path) -> None:
    assert not list((root / ".phibuild").glob("objects/*/*"))
    assert not (root / "artifacts.lock").exists()
    assert not (root / "build").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"models": ["phi3-tiny", "phi9-giant"]}, "unknown model 'phi9-giant'. Known models: "),
        ({"precisions": ["int4", "int3"]},
         "precisions: 'int3' is not a precision (did you mean 'int8'?); choose from int4, int8, fp16, fp32"),
        ({"backends": ["onnx", "tensorrt"]}, "backends: 'tensorrt' is not a backend; choose from onnx, gguf"),
        ({"extra": "[tool.phibuild.params.onnx.int4]\nblock = 64\n"},
         "backend onnx at int4 has no parameter block; its parameters are accuracy_level, algo_config, block_size"),
        ({"extra": "[tool.phibuild.params.onnx.int4]\nblock_size = 48\n"},
         "backend onnx at int4: block_size must be 16, 32, 64, 128 or 256, not 48"),
        ({"extra": "[tool.phibuild.params.onnx]\nalgo_config = 'gptq'\n"},
         "backend onnx at int4: algo_config must be one of default, rtn, k_quant, not 'gptq'"),
        ({"extra": "[tool.phibuild.params.onnx.fp32]\nexecution_provider = 'dml'\n", "precisions": ["int4", "fp32"]},
         "backend onnx at fp32: ONNX Runtime GenAI builds fp32 for execution providers cpu, cuda, not 'dml'"),
        ({"extra": "[tool.phibuild.model.mine]\nrepo = 'me/mine'\n[tool.phibuild.params.onnx.int4]\n"
                   "block_size = 48\n", "models": ["mine"]},
         "backend onnx at int4: block_size must be 16, 32, 64, 128 or 256, not 48"),  # checked before any download
        ({"extra": "[tool.phibuild.model.mine]\nrepo = 'me/mine'\npath = 'x'\n"}, "needs exactly one of path or repo"),
        ({"extra": "colour = 'blue'\n"}, "[tool.phibuild] has unknown field colour; known: backends, build"),
        ({"models": "phi3-tiny"}, "models must be a list of strings, like [\"a\", \"b\"], not 'phi3-tiny'"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path, settings, message):
    root = write_project(tmp_path, settings.get("models", ["phi3-tiny"]), settings.get("backends", ["onnx"]),
                         settings.get("precisions", ["int4"]), extra=settings.get("extra", ""))
    listed = run_doit(root, "list")
    assert listed.code != 0 and message in listed.output, listed.output
    assert "Traceback" not in listed.output
    built = run_doit(root)
    assert built.code != 0 and message in built.output, built.output
    assert "Traceback" not in built.output
    assert_nothing_written(root)


def _broken_model(kind: str, where: Path) -> Path:
    model = copy_model("phi3-tiny", where)
    weights = model / "model.safetensors"
    if kind == "missing weights":
        weights.unlink()
    elif kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif kind == "not a model":
        shutil.rmtree(model)
        model.mkdir()
        (model / "notes.txt").write_text("my holiday pictures")
    elif kind == "config without architectures":
        (model / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    elif kind == "garbage weights":
        weights.write_bytes(b"\xff" * 4096)
    elif kind == "header of another shape":
        header = json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode()  # valid JSON, no data_offsets
        weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    return model


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing weights", "has no *.safetensors weights"),
        ("truncated weights", "model.safetensors is truncated or padded: its header describes"),
        ("not a model", "is not a Hugging Face model directory: it has no config.json"),
        ("config without architectures", "config.json names no architectures"),
        ("garbage weights", "model.safetensors is not a safetensors file or is truncated"),
        ("header of another shape", "model.safetensors has a corrupt safetensors header"),
    ],
)
def test_broken_model_fails_its_task_with_the_reason(tmp_path, kind, message):
    model = _broken_model(kind, tmp_path / "mine")
    root = write_project(tmp_path / "p", ["mine"], ["onnx"], ["int4"], local={"mine": model})
    run = run_doit(root, "quantize:mine-int4-onnx")
    assert run.code != 0
    assert message in run.output
    assert run.built == []
    assert "Traceback" not in run.output
    assert_nothing_written(root)


def test_missing_model_directory(tmp_path):
    root = write_project(tmp_path, ["mine"], ["onnx"], ["int4"], local={"mine": tmp_path / "nowhere"})
    run = run_doit(root, "quantize:mine-int4-onnx")
    assert run.code != 0
    assert f"model directory {tmp_path / 'nowhere'} does not exist" in run.output
    assert_nothing_written(root)


def test_unknown_target_names_the_list_command(tmp_path):
    root = write_project(tmp_path, ["phi3-tiny"], ["onnx"], ["int4"])
    run = run_doit(root, "quantize:phi3-tiny-int2-onnx")
    assert run.code != 0
    assert 'Invalid parameter: "quantize:phi3-tiny-int2-onnx"' in run.output
    assert 'to see available tasks' in run.output
    assert "Did you mean: quantize:phi3-tiny-int4-onnx" in run.output
    assert_nothing_written(root)
    with pytest.raises(PhibuildError, match=r"no target 'phi3-tiny-int2-onnx'; did you mean phi3-tiny-int4-onnx\? "
                                            r"\(`doit list` shows them\)"):
        Project.load(root).target("phi3-tiny-int2-onnx")


@pytest.mark.parametrize("command", [["list"], [], ["verify"], ["gc"], ["release"]])
def test_a_conflicted_lock_is_one_clear_error_for_every_command(tmp_path, command):
    root = write_project(tmp_path, ["phi3-tiny"], ["onnx"], ["int4"])
    (root / "artifacts.lock").write_text('version = 1\n<<<<<<< HEAD\n[artifacts."a"]\n=======\n>>>>>>> b\n')
    run = run_doit(root, *command)
    assert run.code != 0
    assert "artifacts.lock:2: unresolved merge conflict marker '<<<<<<<'" in run.output
    assert "Traceback" not in run.output
