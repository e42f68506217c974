"""Same key, same bytes, on other machines: the committed artifacts.lock is rebuilt from scratch, in frozen mode,
here and under the switches that make this machine's libraries take the code paths of older CPUs.

Each run is a fresh ``doit`` process with its own empty store, building every embedded target of every backend
exactly as the repository's own settings do; frozen mode fails any target whose key or bytes differ from the
committed lock, naming the file. Being fresh processes, the runs also prove that every build ran with only
its key's distributions visible, and needed nothing else (it would fail naming it). The switches:

- torch: ``ATEN_CPU_CAPABILITY`` picks its scalar (``default``) or AVX2 kernels instead of AVX-512;
- numpy: ``NPY_DISABLE_CPU_FEATURES`` turns off the dispatch targets above the x86-64-v2 baseline (numpy 2 names
  them by group, X86_V3 and up; single feature names are silently ignored);
- OpenVINO: ``OV_CPU_MAX_ISA`` caps its CPU plugin's JIT kernels, and ``ONEDNN_MAX_CPU_ISA`` oneDNN's;
- llama.cpp's quantizer and mlx do not dispatch on the CPU at run time (see backends/gguf/fingerprint.py for
  what the GGUF key carries instead).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
from conftest import REPO, copy_model, write_project

from phibuild.catalog import EMBEDDED
from phibuild.lockfile import Lockfile

OLDER = {
    # OpenVINO's CPU plugin cannot run an LLM below AVX2 (PagedAttention's brgemm kernels refuse SSE4.1), so its
    # smoke check could not run there: it is capped at AVX2 in both.
    "x86-64-v2": {"ATEN_CPU_CAPABILITY": "default", "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
                  "OV_CPU_MAX_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
             "OV_CPU_MAX_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def repository_project(root: Path) -> Path:
    """A project with the repository's settings and committed lock, and nothing built."""
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["phibuild"]
    settings["models"] = EMBEDDED  # the hub models, which the repository lists too, are not built here
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(tomli_w.dumps({"tool": {"phibuild": settings}}))
    shutil.copy(REPO / "artifacts.lock", root / "artifacts.lock")
    return root


@pytest.mark.parametrize("machine", ["this machine", *OLDER])
def test_the_committed_lock_is_rebuilt_bit_for_bit(tmp_path, machine):
    root = repository_project(tmp_path / "project")
    env = {**os.environ, **OLDER.get(machine, {}), "PHIBUILD_FROZEN": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root), "quantize"],
                         env=env, capture_output=True, text=True, timeout=1800)
    failures = [line for line in run.stdout.splitlines() if "artifacts.lock" in line or "PHIBUILD" in line]
    assert run.returncode == 0, "\n".join(failures) or run.stdout[-3000:] + run.stderr[-3000:]
    assert (root / "artifacts.lock").read_bytes() == (REPO / "artifacts.lock").read_bytes()
    built = run.stdout.count("phibuild: building ")
    assert built >= 48, f"only {built} builds ran"  # every target and intermediate, from scratch


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_a_rotary_constant_torch_rounds_by_cpu_is_built_the_same_under_every_kernel(tmp_path, backend):
    """phi3-tiny with rope theta 50000: torch's AVX-512 and scalar pow round one of its default rotary frequencies
    differently (measured), which the OpenVINO export stores as a constant and the ONNX builder multiplies into
    its caches. Both keep the correctly rounded value whatever kernels torch picks."""
    model = copy_model("phi3-tiny", tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 50000.0}, indent=2))
    locks = []
    for capability in ("default", None):
        root = write_project(tmp_path / str(capability), ["t"], [backend], ["fp32"], local={"t": model})
        env = {key: value for key, value in os.environ.items() if key != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        run = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(root)], env=env,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        locks.append(Lockfile(root / "artifacts.lock").get(f"t-fp32-{backend}").files)
    assert locks[0] == locks[1]
