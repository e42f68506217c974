"""What a team does with locked artifacts: verify them, rebuild them to compare, release them, collect garbage."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_model, run_doit, write_project

from phibuild import backends
from phibuild.backends.gguf import amx_built_in
from phibuild.card import AMX_FREE_INSTALL, MAIN_PACKAGES
from phibuild.lockfile import Lockfile
from phibuild.release import CARD
from phibuild.report import PAGE


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """phi3-tiny at int4 through every backend, built once for the module; its model card states a license."""
    root = tmp_path_factory.mktemp("team")
    model = copy_model("phi3-tiny", root / "models" / "a")
    (model / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# a\n")
    write_project(root, ["a"], list(backends.MODULES), ["int4"], local={"a": model})
    assert run_doit(root).code == 0
    return root


def test_verify_passes_on_intact_artifacts_and_names_every_mismatch(project, tmp_path):
    assert run_doit(project, "verify").code == 0
    lock = Lockfile(project / "artifacts.lock").read().artifacts

    visible = project / "build" / "a-int4-onnx" / "model.onnx.data"  # a copy (see OnnxBackend.unlinkable)
    original = visible.read_bytes()
    os.chmod(visible, 0o644)
    visible.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    gguf = lock["a-int4-gguf"]
    stored = project / ".phibuild" / "objects" / gguf.key[:2] / gguf.key / "artifact" / "model.gguf"
    stat = stored.stat()
    data = bytearray(stored.read_bytes())
    data[100] ^= 1
    os.chmod(stored, 0o644)
    stored.write_bytes(bytes(data))
    os.utime(stored, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # bit rot: size and mtime unchanged
    (project / "build" / "a-int4-onnx" / "notes.txt").write_text("mine")
    try:
        run = run_doit(project, "verify")
        assert run.code != 0
        assert "a-int4-onnx: build: model.onnx.data differs" in run.output
        assert "a-int4-onnx: build: notes.txt is not in artifacts.lock" in run.output
        # the store file and its hardlink under build/ are one file, read once, reported in both places
        assert "a-int4-gguf: store: model.gguf differs" in run.output
        assert "a-int4-gguf: build: model.gguf differs" in run.output
        assert "a-int4-onnx: store:" not in run.output
    finally:
        visible.write_bytes(original)
        data[100] ^= 1
        stored.write_bytes(bytes(data))
        (project / "build" / "a-int4-onnx" / "notes.txt").unlink()
    assert run_doit(project, "verify").code == 0


def test_release_bundle_checks_with_sha256sum_and_has_model_cards(project):
    run = run_doit(project, "release")
    assert run.code == 0, run.output
    release = project / "release"
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=release, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    lock = Lockfile(project / "artifacts.lock").read().artifacts
    sums = dict(reversed(line.split("  ")) for line in (release / "SHA256SUMS").read_text().splitlines())
    for name, entry in lock.items():
        for file, want in entry.files.items():
            assert sums[f"{name}/{file}"] == want.sha256
            copy, stored = release / name / file, project / "build" / name / file
            assert copy.stat().st_ino != stored.stat().st_ino  # a copy: editing it cannot reach the store
        card = (release / name / CARD).read_text()
        packages = entry.parts.toolchain.packages
        for fact in (entry.source, entry.parts.backend, entry.parts.precision, entry.smoke.result, entry.key,
                     *(f"{p} {packages[p]}" for p in MAIN_PACKAGES[entry.parts.backend] if p in packages)):
            assert fact in card, fact
    page = (release / "report" / PAGE).read_text()  # the report of the released artifacts, summed with them
    assert sums[f"report/{PAGE}"] and all(f"| a | {entry.parts.backend} | int4 |" in page for entry in lock.values())

    write_project(project, ["a"], ["onnx", "gguf"], ["int4"], local={"a": project / "models" / "a"},
                  extra='release = ["a-int4-gguf"]\n')
    assert run_doit(project, "release").code == 0
    assert sorted(p.name for p in release.iterdir()) == ["SHA256SUMS", "a-int4-gguf", "report"]
    assert "| a | gguf | int4 |" in (release / "report" / PAGE).read_text()
    assert "| a | onnx |" not in (release / "report" / PAGE).read_text()


@pytest.mark.parametrize("backend", list(backends.MODULES))
def test_model_cards_follow_the_hubs_conventions_and_their_snippet_runs(project, backend, tmp_path):
    from huggingface_hub import ModelCard

    write_project(project, ["a"], list(backends.MODULES), ["int4"], local={"a": project / "models" / "a"})
    release = project / "release"
    if not (release / f"a-int4-{backend}").is_dir():
        assert run_doit(project, "release").code == 0
    text = (release / f"a-int4-{backend}" / CARD).read_text()
    card = ModelCard(text)  # the hub's own parser of the front matter
    assert card.data.license == "apache-2.0"  # the source's, from its card
    assert card.data.library_name == {"onnx": "onnxruntime-genai"}.get(backend, backend)
    assert card.data.pipeline_tag == "text-generation"
    assert {"phibuild", backend, "int4"} <= set(card.data.tags)
    for section in ("## How to run it", "## Checks", "## Limitations", "## Files"):
        assert section in text
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    copy = tmp_path / "copy"
    shutil.copytree(release / f"a-int4-{backend}", copy)
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=copy, capture_output=True, text=True, timeout=600)
    if backend == "gguf" and amx_built_in():
        # llama.cpp's AMX matmul crashes (ggml-org/llama.cpp#20824); the card says so and how to install around it
        assert ran.returncode == -signal.SIGSEGV, (ran.returncode, ran.stderr[-2000:])
        assert AMX_FREE_INSTALL in text
        return
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip(), "the snippet generated nothing"


def test_gc_lists_then_removes_only_unreferenced_entries(tmp_path):
    model = copy_model("phi3-tiny", tmp_path / "a")
    root = write_project(tmp_path / "p", ["a"], ["gguf"], ["int4"], local={"a": model})
    assert run_doit(root).code == 0
    old = Lockfile(root / "artifacts.lock").get("a-int4-gguf")
    write_project(root, ["a"], ["gguf"], ["int4"], local={"a": model},
                  extra='[tool.phibuild.params.gguf.int4]\ntype = "Q4_0"\n')
    assert run_doit(root).code == 0
    new = Lockfile(root / "artifacts.lock").get("a-int4-gguf")
    assert new.intermediate == old.intermediate  # both start from the same F16 conversion
    objects = root / ".phibuild" / "objects"

    listed = run_doit(root, "gc")
    assert listed.code == 0
    assert f"would remove {old.key} (a-int4-gguf, " in listed.output
    assert "1 unreferenced entries" in listed.output
    assert (objects / old.key[:2] / old.key).is_dir()

    removed = run_doit(root, "gc", "--delete")
    assert removed.code == 0 and f"removing {old.key}" in removed.output
    assert not (objects / old.key[:2] / old.key).exists()
    assert (objects / new.key[:2] / new.key).is_dir()
    assert (objects / new.intermediate.key[:2] / new.intermediate.key).is_dir()
    assert run_doit(root).built == []


@pytest.mark.parametrize("backend", list(backends.MODULES))
def test_every_backend_rebuilds_bit_identically(tmp_path, backend):
    """The record of what is bit-reproducible: a fresh rebuild of each backend's int4 and fp32 artifacts,
    bypassing every cache, gives the locked bytes."""
    root = write_project(tmp_path, ["phi4-mini-tiny"], [backend], ["int4", "fp32"])
    assert run_doit(root).code == 0
    run = run_doit(root, "reproduce")
    assert run.code == 0, run.output
    assert run.output.count(": reproducible (every file identical to artifacts.lock)") == 2


def test_reproduce_reports_the_files_that_differ(project):
    """A lock that pins other bytes than the build makes (as a drifting toolchain would)."""
    lock = project / "artifacts.lock"
    entry = Lockfile(lock).get("a-int4-gguf")
    digest = entry.files["model.gguf"]
    text = lock.read_text()
    (project / "drifted.lock").write_text(text.replace(digest.sha256, "1" * 64))
    run = run_doit(project, "reproduce:a-int4-gguf", "--lock", "drifted.lock")
    assert run.code != 0
    assert "a-int4-gguf: NOT reproducible: model.gguf: rebuilt " in run.output
    assert f"sha256 {digest.sha256[:16]}, locked {digest.size} bytes, sha256 1111111111111111" in run.output
