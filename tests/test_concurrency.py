"""Processes racing for one target, and writes that fail half-way: the store and the lock stay consistent."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

from conftest import copy_model, doit_process, run_doit, write_project

from phibuild.lockfile import Lockfile

TARGET = "a-int4-onnx"


def test_two_processes_building_one_target_build_it_once(tmp_path):
    model = copy_model("phi3-tiny", tmp_path / "a")
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4"], local={"a": model})
    racers = [doit_process(root, f"quantize:{TARGET}") for _ in range(2)]
    outputs = [racer.communicate(timeout=600)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], outputs
    assert sum(output.count(f"phibuild: building {TARGET}:") for output in outputs) == 1, outputs
    assert sum(f"{TARGET}: restored from the store" in output for output in outputs) == 1, outputs
    entry = Lockfile(root / "artifacts.lock").get(TARGET)
    assert [p.name for p in (root / ".phibuild" / "objects").glob("*/*")] == [entry.key]
    assert list((root / ".phibuild" / "tmp").iterdir()) == []


def test_doit_with_two_workers_locks_every_target(tmp_path):
    """doit -n 2 forks workers that write artifacts.lock concurrently: no entry may be lost."""
    root = write_project(tmp_path, ["phi3-tiny", "phi4-mini-tiny"], ["gguf"], ["int4", "int8", "fp16"])
    workers = doit_process(root, "-n", "2", "quantize")
    output = workers.communicate(timeout=600)[0]
    assert workers.returncode == 0, output
    lock = Lockfile(root / "artifacts.lock").read().artifacts
    assert sorted(lock) == sorted(f"{m}-{p}-gguf" for m in ("phi3-tiny", "phi4-mini-tiny")
                                  for p in ("int4", "int8", "fp16"))
    assert all(entry.smoke.result.startswith("ok: ") for entry in lock.values())


def _limit_file_size() -> None:
    """In the child: the kernel refuses to write any file past 1 MB (EFBIG), as a full disk refuses
    (ENOSPC); the signal it would also send is ignored so that the write fails instead of the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_write_that_fails_mid_build_leaves_store_and_lock_as_they_were(tmp_path):
    model = copy_model("phi3-tiny", tmp_path / "a")
    root = write_project(tmp_path / "p", ["a"], ["onnx"], ["int4", "fp32"], local={"a": model})
    first = run_doit(root, "quantize:a-fp32-onnx")
    assert first.code == 0
    lock_before = (root / "artifacts.lock").read_bytes()
    objects_before = sorted(p.name for p in (root / ".phibuild" / "objects").glob("*/*"))

    starved = doit_process(root, f"quantize:{TARGET}", preexec_fn=_limit_file_size)
    output = starved.communicate(timeout=600)[0]
    assert starved.returncode != 0, output
    assert "File too large" in output or "No space left" in output, output
    assert (root / "artifacts.lock").read_bytes() == lock_before
    assert sorted(p.name for p in (root / ".phibuild" / "objects").glob("*/*")) == objects_before
    assert list((root / ".phibuild" / "tmp").iterdir()) == []
    assert not (root / "build" / TARGET).exists()

    again = run_doit(root)
    assert again.code == 0 and again.built == [TARGET], again.output


def test_an_interrupted_download_from_the_remote_leaves_no_half_entry(tmp_path, monkeypatch):
    from phibuild.remote import Remote

    model = copy_model("phi3-tiny", tmp_path / "a")
    remote = str(tmp_path / "remote")
    settings = f'remote = "{remote}"\n'
    one = write_project(tmp_path / "one", ["a"], ["onnx"], ["int4"], local={"a": model}, extra=settings)
    assert run_doit(one).code == 0

    real_download = Remote._download
    calls = []

    def download_then_cut(self, blob, path, *args):
        calls.append(blob)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise ConnectionAbortedError("the connection dropped")
        return real_download(self, blob, path, *args)

    monkeypatch.setattr(Remote, "_download", download_then_cut)
    two = write_project(tmp_path / "two", ["a"], ["onnx"], ["int4"], local={"a": model}, extra=settings)
    run = run_doit(two)
    assert "(ConnectionAbortedError: the connection dropped); building locally" in run.output
    assert run.code == 0 and run.built == [TARGET], run.output
    assert list((two / ".phibuild" / "tmp").iterdir()) == []
    assert Lockfile(two / "artifacts.lock").read() == Lockfile(one / "artifacts.lock").read()
