"""The build as a user sees it, through doit and the ONNX Runtime GenAI backend: what is rebuilt, what is
restored, what is pinned in artifacts.lock, and what a crash leaves behind.

Tests that do not count first builds share one store (``shared_store``), as projects on one machine may:
a key built by one test is restored by the next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import xxhash
from conftest import copy_model, doit_process, lock_of, run_doit, write_project

from phibuild.hashing import digest_tree
from phibuild.project import Project


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-store")


def flip_weight_byte(model_dir: Path, at: int = 1001) -> None:
    """Change one byte inside the tensor data of a model's bf16 safetensors; the file stays valid.

    At an odd offset, flipping bit 0 flips an exponent bit: one weight is multiplied or divided by 4,
    enough to change its quantization block, not enough to overflow.
    """
    path = model_dir / "model.safetensors"
    with open(path, "r+b") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        offset = 8 + header_len + at
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def test_first_build_pins_every_file_and_a_second_run_reads_nothing(tmp_path):
    model = copy_model("phi3-tiny", tmp_path / "models" / "a")
    root = write_project(tmp_path, ["a"], ["onnx"], ["int4", "fp32"], local={"a": model})

    first = run_doit(root)
    assert first.code == 0, first.output
    assert sorted(first.built) == ["a-fp32-onnx", "a-int4-onnx"]

    lock = lock_of(root)
    assert sorted(lock) == ["a-fp32-onnx", "a-int4-onnx"]
    source_files = {p.name: xxhash.xxh3_128_hexdigest(p.read_bytes()) for p in model.iterdir()}
    for name, entry in lock.items():
        assert entry["model"] == "a"
        assert entry["source"] == "path:models/a"
        assert entry["source_digest"] == digest_tree(source_files)
        assert entry["backend"] == "onnx"
        assert entry["versions"]["onnxruntime-genai"] == importlib.metadata.version("onnxruntime-genai")
        assert entry["smoke"]["result"].startswith("ok: "), entry["smoke"]
        visible = root / "build" / name
        assert sorted(entry["files"]) == sorted(p.name for p in visible.iterdir())
        assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= set(entry["files"])
        for file, want in entry["files"].items():
            data = (visible / file).read_bytes()
            assert want == {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data),
                            "sha256": hashlib.sha256(data).hexdigest()}
    assert lock["a-int4-onnx"]["params"]["block_size"] == 32
    assert lock["a-int4-onnx"]["precision"] == "int4"
    assert lock["a-int4-onnx"]["key"] != lock["a-fp32-onnx"]["key"]

    second = run_doit(root)
    assert second.code == 0, second.output
    assert second.built == [] and second.restored == []
    assert "-- quantize:a-int4-onnx" in second.output and "-- quantize:a-fp32-onnx" in second.output
    assert (second.bytes_read, second.weight_opens) == (0, 0)
    assert lock_of(root) == lock


def test_one_changed_weight_byte_rebuilds_that_models_tasks_only(tmp_path, shared_store):
    a = copy_model("phi3-tiny", tmp_path / "a")
    b = copy_model("phi3-tiny", tmp_path / "b")
    flip_weight_byte(b, at=2001)  # b differs from every other test's model; a may be restored from the store
    root = write_project(tmp_path / "p", ["a", "b"], ["onnx"], ["int4"], local={"a": a, "b": b},
                         store=shared_store)
    assert run_doit(root).code == 0
    before = lock_of(root)

    flip_weight_byte(a)
    info = run_doit(root, "info", "quantize:a-int4-onnx")
    assert "cache key changed: source: " in info.output
    run = run_doit(root)
    assert run.code == 0, run.output
    assert run.built == ["a-int4-onnx"]
    after = lock_of(root)
    assert after["b-int4-onnx"] == before["b-int4-onnx"]
    assert after["a-int4-onnx"]["source_digest"] != before["a-int4-onnx"]["source_digest"]
    assert after["a-int4-onnx"]["files"]["model.onnx.data"] != before["a-int4-onnx"]["files"]["model.onnx.data"]


def test_parameter_and_precision_changes_rebuild_only_their_tasks(tmp_path, shared_store):
    a = copy_model("phi3-tiny", tmp_path / "a")
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4", "fp32"], local={"a": a}, store=shared_store)
    assert run_doit(root).code == 0
    before = lock_of(root)

    write_project(root, ["a"], ["onnx"], ["int4", "fp32"], local={"a": a}, store=shared_store,
                  extra="[tool.phibuild.params.onnx.int4]\nblock_size = 64\n")
    info = run_doit(root, "info", "quantize:a-int4-onnx")
    assert "cache key changed: params: block_size 32 -> 64" in info.output
    run = run_doit(root)
    assert run.code == 0, run.output
    assert run.built == ["a-int4-onnx"]
    after = lock_of(root)
    assert after["a-fp32-onnx"] == before["a-fp32-onnx"]
    assert after["a-int4-onnx"]["params"]["block_size"] == 64

    write_project(root, ["a"], ["onnx"], ["int4", "int8", "fp32"], local={"a": a}, store=shared_store,
                  extra="[tool.phibuild.params.onnx.int4]\nblock_size = 64\n")
    run = run_doit(root)
    assert run.code == 0, run.output
    assert run.built == ["a-int8-onnx"]
    assert lock_of(root)["a-int4-onnx"] == after["a-int4-onnx"]


def test_backend_version_change_rebuilds_its_tasks_and_frozen_mode_refuses(tmp_path, shared_store,
                                                                        monkeypatch):
    a = copy_model("phi3-tiny", tmp_path / "a")
    root = write_project(tmp_path / "p", ["a"], ["onnx", "gguf"], ["int4"], local={"a": a}, store=shared_store)
    assert run_doit(root).code == 0
    before = lock_of(root)
    installed = Project.toolchain

    def newer(self, backend):
        toolchain = installed(self, backend)
        if backend.name != "onnx":
            return toolchain
        return dataclasses.replace(toolchain, packages={**toolchain.packages, "onnxruntime-genai": "99.0"})

    monkeypatch.setattr(Project, "toolchain", newer)
    info = run_doit(root, "info", "quantize:a-int4-onnx")
    assert "cache key changed: versions: onnxruntime-genai 0.18.0 -> 99.0" in info.output
    monkeypatch.setenv("PHIBUILD_FROZEN", "1")
    frozen = run_doit(root)
    assert frozen.code != 0
    assert ("this phibuild's toolchain locks differ from those artifacts.lock was built with (onnx: "
            "onnxruntime-genai 0.18.0 -> 99.0): every target of onnx is stale for that reason alone") in frozen.output
    assert frozen.output.count("toolchain locks differ") == 1  # said once, not once per target
    assert lock_of(root) == before

    monkeypatch.delenv("PHIBUILD_FROZEN")
    run = run_doit(root)
    assert run.code == 0, run.output
    assert run.output.count("toolchain locks differ") == 1
    assert run.built == ["a-int4-onnx"]
    after = lock_of(root)
    assert after["a-int4-onnx"]["versions"]["onnxruntime-genai"] == "99.0"
    assert after["a-int4-gguf"] == before["a-int4-gguf"]  # another backend's versions: not its key


def test_frozen_mode_accepts_an_unchanged_lock(tmp_path, shared_store, monkeypatch):
    a = copy_model("phi3-tiny", tmp_path / "a")
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4"], local={"a": a}, store=shared_store)
    assert run_doit(root).code == 0
    shutil.rmtree(root / "build")
    lock_inode = (root / "artifacts.lock").stat().st_ino
    monkeypatch.setenv("PHIBUILD_FROZEN", "1")
    run = run_doit(root)
    assert run.code == 0, run.output
    assert run.restored == ["a-int4-onnx"]
    assert (root / "artifacts.lock").stat().st_ino == lock_inode  # an unchanged entry is not written again

    moved = copy_model("phi3-tiny", tmp_path / "moved")  # same bytes, same key: only the lock's source differs
    before = lock_of(root)
    write_project(root, ["a"], ["onnx"], ["int4"], local={"a": moved}, store=shared_store)
    run = run_doit(root)
    assert run.code != 0
    assert "a-int4-onnx: artifacts.lock would change (source) and PHIBUILD_FROZEN is set" in run.output
    assert lock_of(root) == before


def test_deleted_artifact_is_restored_and_a_damaged_store_file_rebuilt(tmp_path, shared_store):
    a = copy_model("phi3-tiny", tmp_path / "a")
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4"], local={"a": a}, store=shared_store)
    assert run_doit(root).code == 0
    entry = lock_of(root)["a-int4-onnx"]
    visible = root / "build" / "a-int4-onnx"

    shutil.rmtree(visible)
    info = run_doit(root, "info", "quantize:a-int4-onnx")
    assert "is missing or modified (restorable from the store)" in info.output
    run = run_doit(root)
    assert run.code == 0 and run.built == [] and run.restored == ["a-int4-onnx"], run.output

    assert run_doit(root, "clean", "quantize:a-int4-onnx").code == 0
    assert not visible.exists()
    stored = shared_store / "objects" / entry["key"][:2] / entry["key"] / "artifact"
    assert (stored / "model.onnx").is_file()
    run = run_doit(root)
    assert run.code == 0 and run.built == [] and run.restored == ["a-int4-onnx"], run.output

    damaged = stored / "genai_config.json"
    os.chmod(damaged, 0o644)
    damaged.write_text(damaged.read_text().replace('"do_sample": false', '"do_sample": true '))
    info = run_doit(root, "info", "quantize:a-int4-onnx")
    assert "store files differ from artifacts.lock: genai_config.json" in info.output
    run = run_doit(root)
    assert run.code == 0 and run.built == ["a-int4-onnx"], run.output
    assert lock_of(root)["a-int4-onnx"]["files"] == entry["files"]
    assert json.loads((visible / "genai_config.json").read_text())["search"]["do_sample"] is False


def test_a_build_killed_mid_way_leaves_nothing_that_looks_fresh(tmp_path):
    model = copy_model("phi3-tiny", tmp_path / "a")
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4"], local={"a": model})
    store = root / ".phibuild"
    process = doit_process(root, "quantize:a-int4-onnx", start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(store.glob("tmp/*/artifact")):  # the backend is running
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.01)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    assert list(store.glob("objects/*/*")) == []
    assert not (root / "artifacts.lock").exists() or lock_of(root) == {}
    assert not (root / "build" / "a-int4-onnx").exists()
    assert list(store.glob("tmp/*")), "the killed build's directory should be what is left"

    run = run_doit(root)
    assert run.code == 0 and run.built == ["a-int4-onnx"], run.output
    assert list(store.glob("tmp/*")) == []
    assert list(lock_of(root)) == ["a-int4-onnx"]


@pytest.mark.parametrize("model", ["phi3-tiny", "phi4-mini-tiny"])
def test_builds_in_two_directories_are_bit_identical(tmp_path, model):
    locks = []
    for place in ("one", "two"):
        root = write_project(tmp_path / place, [model], ["onnx"], ["int4", "fp32"])
        run = run_doit(root)
        assert run.code == 0 and len(run.built) == 2, run.output
        locks.append(lock_of(root))
    assert locks[0] == locks[1]
