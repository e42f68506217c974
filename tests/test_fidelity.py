"""The fidelity step: every backend's artifacts measured in their own runtimes against float32 transformers.

One doit run quantizes and measures phi3-tiny (plain RoPE) and phi35-tiny (LongRoPE) at int4 and fp32 on every
backend, over 2 windows of 256 tokens; most tests read its lock. Bounds are an order of magnitude or more from
the measured figures (README, "Fidelity"), so that other CPUs' kernels and runtime defaults (bf16 execution in
OpenVINO) stay inside them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import Run, run_doit, write_project

from phibuild import fidelity
from phibuild.backends import MODULES
from phibuild.errors import ConfigError
from phibuild.lockfile import Lockfile
from phibuild.project import Project

MODELS = ["phi3-tiny", "phi35-tiny"]
SHORT = "eval_length = 256\n"  # 2 windows of 256 tokens: mlx's CPU quantized matmul runs 60 tokens/s
MEASURING = re.compile(r"^phibuild: (measuring the fidelity|computing the fidelity reference)", re.MULTILINE)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[Path, Run]:
    root = write_project(tmp_path_factory.mktemp("fidelity"), MODELS, list(MODULES), ["int4", "fp32"], extra=SHORT)
    run = run_doit(root, "fidelity")
    assert run.code == 0, run.output
    return root, run


def records(root: Path) -> dict:
    return {name: entry.fidelity for name, entry in Lockfile(root / "artifacts.lock").read().artifacts.items()}


def test_every_artifact_is_measured_against_its_source(measured):
    root, run = measured
    found = records(root)
    assert len(found) == len(MODELS) * len(MODULES) * 2
    for name, record in found.items():
        assert record is not None and record.not_run is None, name
        assert record.tokens == 2 * 256
        assert abs(record.ppl / record.ppl_reference - 1) < 0.05, name
        if "-fp32-" in name:
            assert record.kl < 2e-4 and record.top1 > 0.98, (name, record)
        else:  # int4: measurably lossy, and within its default gate
            assert 1e-4 < record.kl < 0.05 and record.top1 > 0.8, (name, record)
        assert record.kl_se < record.kl
    # one reference per source model, shared by its artifacts
    assert len({record.reference for record in found.values()}) == len(MODELS)
    assert len(MEASURING.findall(run.output)) == len(found) + len(MODELS)


def test_mlx_follows_transformers_on_longrope(measured):
    """mlx-lm 0.31 applies LongRoPE's long factors everywhere; the staged config makes it match within the
    original context (KL was 0.11 nats/token at fp32 before)."""
    record = records(measured[0])["phi35-tiny-fp32-mlx"]
    assert record.kl < 1e-5 and record.top1 > 0.995, record


def test_a_second_run_measures_nothing(measured):
    run = run_doit(measured[0], "fidelity")
    assert run.code == 0, run.output
    assert not MEASURING.search(run.output), run.output
    assert run.bytes_read == 0


def test_measurements_are_cached_in_the_store(measured):
    root, _ = measured
    lock = Lockfile(root / "artifacts.lock")
    before = records(root)
    name = "phi3-tiny-int4-onnx"
    lock.put(name, replace(lock.get(name), fidelity=None))
    run = run_doit(root, f"fidelity:{name}")
    assert run.code == 0, run.output
    assert not MEASURING.search(run.output), run.output
    assert f"{name}: fidelity KL" in run.output and "restored from the store" in run.output
    assert records(root)[name] == before[name]


def test_a_broken_quantization_fails_its_gate(tmp_path):
    """2-bit weights in groups of 128 wreck the model (KL about 0.2 nats/token): the default int4 gate catches it,
    naming the metric, the value and the gate; a project that accepts it says so in its own gate."""
    broken = "[tool.phibuild.params.mlx.int4]\nbits = 2\ngroup_size = 128\n"
    root = write_project(tmp_path, ["phi3-tiny"], ["mlx"], ["int4"], extra=SHORT + broken)
    run = run_doit(root, "fidelity")
    assert run.code != 0
    failed = re.search(r"phi3-tiny-int4-mlx fails its fidelity gate: mean KL (\S+) nats/token is over the gate 0.1 "
                       r"\(\[tool.phibuild.gates.int4\] kl\)", run.output)
    assert failed and float(failed[1]) > 0.1, run.output
    write_project(tmp_path, ["phi3-tiny"], ["mlx"], ["int4"],
                  extra=SHORT + broken + "[tool.phibuild.gates.int4]\nkl = 1.0\ntop1 = 0.3\n")
    again = run_doit(root, "fidelity")
    assert again.code == 0, again.output
    assert not MEASURING.search(again.output)  # the record stands; only the gate changed


def test_compare_measures_what_it_says():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 8, 5))
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = rng.integers(0, 5, size=(2, 9))
    same = fidelity.compare(logprobs, tokens, [row + 3.0 for row in logits])  # softmax ignores a shift
    assert same["kl"] < 1e-12 and same["top1"] == 1.0 and same["ppl"] == pytest.approx(same["ppl_reference"])
    flat = fidelity.compare(logprobs, tokens, [np.zeros_like(row) for row in logits])  # uniform: KL = log 5 - H
    entropy = -(np.exp(logprobs) * logprobs).sum(-1).mean()
    assert flat["kl"] == pytest.approx(np.log(5) - entropy, rel=1e-9)
    assert flat["ppl"] == pytest.approx(5.0)


@pytest.mark.parametrize(("setting", "message"), [
    ("[tool.phibuild.gates.int3]\nkl = 0.1\n", "'int3' is not a precision"),
    ("[tool.phibuild.gates.int4]\nkl = -1\n", "kl must be a finite number of zero or more"),
    ("[tool.phibuild.gates.int4]\nppl = 2\n", "ppl"),
    ("eval_windows = 0\n", "eval_windows must be at least 1"),
])
def test_bad_fidelity_settings_are_one_message(tmp_path, setting, message):
    root = write_project(tmp_path, ["phi3-tiny"], ["gguf"], ["int4"], extra=setting)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Project.load(root)


def test_frozen_mode_refuses_to_measure_what_the_lock_lacks(measured, monkeypatch):
    root, _ = measured
    lock, name = Lockfile(root / "artifacts.lock"), "phi3-tiny-fp32-gguf"
    lock.put(name, replace(lock.get(name), fidelity=None))
    monkeypatch.setenv("PHIBUILD_FROZEN", "1")
    run = run_doit(root, f"fidelity:{name}")
    assert run.code != 0 and "PHIBUILD_FROZEN is set" in run.output, run.output
    assert not MEASURING.search(run.output) and lock.get(name).fidelity is None
    monkeypatch.delenv("PHIBUILD_FROZEN")
    assert run_doit(root, f"fidelity:{name}").code == 0 and lock.get(name).fidelity is not None
