"""The remote store: shared by machines through fsspec, never trusted blindly, never a reason to hang.

Machines are separate project directories with separate stores; the remote is a plain directory or a real
S3-compatible server (moto's) on loopback. The CI fan-out runs its slices as separate doit processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from conftest import closed_port, copy_model, doit_process, run_doit, write_project
from moto.server import ThreadedMotoServer

from phibuild.lockfile import Lockfile
from phibuild.remote import Remote
from phibuild.store import Store

TARGET = "a-int4-onnx"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return copy_model("phi3-tiny", tmp_path_factory.mktemp("model") / "a")


def machine(root: Path, model: Path, remote: str | None, extra: str = "", precisions=("int4",)) -> Path:
    settings = extra
    if remote:
        settings = f"remote = {json.dumps(remote)}\nremote_timeout = 2\n" + settings
    return write_project(root, ["a"], ["onnx"], list(precisions), local={"a": model}, extra=settings)


def blobs(remote_dir: Path) -> list[Path]:
    return sorted(p for p in (remote_dir / "blobs").rglob("*") if p.is_file())


def test_a_key_built_on_one_machine_is_pulled_by_another(tmp_path, model):
    remote = tmp_path / "remote"
    one = machine(tmp_path / "one", model, str(remote))
    built = run_doit(one)
    assert built.code == 0 and built.built == [TARGET], built.output
    entry = Lockfile(one / "artifacts.lock").get(TARGET)
    assert (remote / "keys" / entry.key[:2] / f"{entry.key}.json").is_file()
    assert len(blobs(remote)) == len(entry.files)
    assert not list(remote.rglob("*.partial-*"))

    two = machine(tmp_path / "two", model, str(remote))
    pulled = run_doit(two)
    assert pulled.code == 0 and pulled.built == [], pulled.output
    assert f"{TARGET}: pulled from the remote {remote}" in pulled.output
    pinned = Lockfile(two / "artifacts.lock").get(TARGET)
    assert pinned == dataclasses.replace(entry, smoke=dataclasses.replace(entry.smoke, pulled_from=str(remote)))
    assert pinned.smoke.unverified  # the lock of machine two did not pin it: nobody vouched for it yet
    assert f"(checked where it was built; pulled from {remote}; UNVERIFIED" in pinned.smoke.summary()
    assert run_doit(two, "release").code != 0
    assert run_doit(two, f"reproduce:{TARGET}").code == 0  # rebuilt here to the same bytes: vouched for
    card = run_doit(two, "release")
    assert card.code == 0, card.output
    for name in entry.files:
        assert (two / "build" / TARGET / name).read_bytes() == (one / "build" / TARGET / name).read_bytes()
    again = run_doit(two)
    assert (again.code, again.built, again.bytes_read) == (0, [], 0), again.output  # pulled files: hashed once


def test_a_tampered_remote_blob_is_refused_and_the_build_goes_on_locally(tmp_path, model):
    remote = tmp_path / "remote"
    one = machine(tmp_path / "one", model, str(remote))
    assert run_doit(one).code == 0
    largest = max(blobs(remote), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))

    two = machine(tmp_path / "two", model, str(remote))
    run = run_doit(two)
    assert "does not match the digests in its manifest); building locally" in run.output
    assert run.output.count("phibuild: warning:") == 1
    assert run.code == 0 and run.built == [TARGET], run.output
    assert Lockfile(two / "artifacts.lock").read() == Lockfile(one / "artifacts.lock").read()
    assert list((two / ".phibuild" / "tmp").iterdir()) == []


def test_a_remote_manifest_that_contradicts_the_lock_is_refused(tmp_path, caplog, model):
    """The lock pins the files of a key; a remote offering other files under that key is not believed."""
    remote = tmp_path / "remote"
    one = machine(tmp_path / "one", model, str(remote))
    assert run_doit(one).code == 0
    entry = Lockfile(one / "artifacts.lock").get(TARGET)
    forged = dict(entry.files)
    forged["genai_config.json"] = dataclasses.replace(forged["genai_config.json"], sha256="0" * 64)
    with caplog.at_level(logging.WARNING, logger="phibuild"):
        assert Remote(str(remote)).pull(entry.key, forged, Store(tmp_path / "store")) is None
    assert "its manifest lists other files than artifacts.lock pins" in caplog.text


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_remote_served_over_http_is_read_only_but_pulled_from(tmp_path, model):
    remote = tmp_path / "remote"
    one = machine(tmp_path / "one", model, str(remote))
    assert run_doit(one).code == 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(remote)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        two = machine(tmp_path / "two", model, url)
        pulled = run_doit(two)
        assert pulled.code == 0 and pulled.built == [], pulled.output
        assert f"{TARGET}: pulled from the remote {url}" in pulled.output
        assert Lockfile(two / "artifacts.lock").get(TARGET).smoke.pulled_from == url
        assert Lockfile(two / "artifacts.lock").get(TARGET).files == Lockfile(one / "artifacts.lock").get(TARGET).files

        fp32 = machine(tmp_path / "three", model, url, precisions=("fp32",))
        built = run_doit(fp32)
        assert built.code == 0 and built.built == ["a-fp32-onnx"], built.output
        assert "the local build is kept" in built.output  # HTTP takes no uploads
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_or_silent_remote_means_a_local_build_with_a_warning(tmp_path, model):
    down = machine(tmp_path / "down", model, "s3://phibuild/cache",
                   extra=f'[tool.phibuild.remote_options]\nendpoint_url = "http://127.0.0.1:{closed_port()}"\n'
                         'key = "k"\nsecret = "s"\n[tool.phibuild.remote_options.config_kwargs]\n'
                         "connect_timeout = 1\nretries = {max_attempts = 1}\n")
    run = run_doit(down)
    assert "phibuild: warning: remote s3://phibuild/cache is not usable" in run.output
    assert run.code == 0 and run.built == [TARGET], run.output

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        slow = machine(tmp_path / "slow", model, "s3://phibuild/cache",
                       extra=f'[tool.phibuild.remote_options]\nendpoint_url = "http://127.0.0.1:'
                             f'{silent.getsockname()[1]}"\nkey = "k"\nsecret = "s"\n')
        started = time.monotonic()
        run = run_doit(slow)
        assert "is not usable (no answer within 2 s); building locally" in run.output
        assert run.code == 0 and run.built == [TARGET], run.output
        assert time.monotonic() - started < 60


def test_an_interrupted_upload_publishes_nothing_and_the_next_push_completes(tmp_path, model,
                                                                            monkeypatch):
    remote = tmp_path / "remote"
    one = machine(tmp_path / "one", model, str(remote))
    real_put = Remote._put
    calls = []

    def put_then_fail(self, local, target, deadline):
        calls.append(target)
        if len(calls) == 3:
            raise ConnectionResetError("connection reset by peer")
        return real_put(self, local, target, deadline)

    monkeypatch.setattr(Remote, "_put", put_then_fail)
    run = run_doit(one)
    assert "(ConnectionResetError: connection reset by peer); the local build is kept" in run.output
    assert run.code == 0 and run.built == [TARGET], run.output  # the local build is kept
    assert not list((remote / "keys").rglob("*.json")), "a manifest without all its blobs was published"
    assert not list(remote.rglob("*.partial-*"))

    monkeypatch.setattr(Remote, "_put", real_put)
    entry = Lockfile(one / "artifacts.lock").get(TARGET)
    pusher = Remote(str(remote))
    pusher.push(Store(one / ".phibuild").get(entry.key))
    assert pusher.failure is None
    two = machine(tmp_path / "two", model, str(remote))
    pulled = run_doit(two)
    assert pulled.code == 0 and pulled.built == [], pulled.output


def test_s3_compatible_server_on_loopback(tmp_path, model, monkeypatch):
    """The same round trip through a real S3 API (moto's server), with credentials from the environment."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for name, value in {"AWS_ACCESS_KEY_ID": "phibuild", "AWS_SECRET_ACCESS_KEY": "phibuild",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="team")
        options = f'[tool.phibuild.remote_options]\nendpoint_url = "{endpoint}"\n'
        one = machine(tmp_path / "one", model, "s3://team/phibuild", extra=options)
        built = run_doit(one)
        assert built.code == 0 and built.built == [TARGET], built.output
        entry = Lockfile(one / "artifacts.lock").get(TARGET)
        listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="team")["Contents"]
        names = {item["Key"] for item in listed}
        assert f"phibuild/keys/{entry.key[:2]}/{entry.key}.json" in names
        assert {f"phibuild/blobs/{f.xxh3_128[:2]}/{f.xxh3_128}" for f in entry.files.values()} <= names

        two = machine(tmp_path / "two", model, "s3://team/phibuild", extra=options)
        pulled = run_doit(two)
        assert pulled.code == 0 and pulled.built == [], pulled.output
        assert "pulled from the remote s3://team/phibuild" in pulled.output
        assert Lockfile(two / "artifacts.lock").get(TARGET).files == entry.files
    finally:
        server.stop()


def test_ci_fan_out_builds_slices_in_two_processes_and_assembles_one_lock(tmp_path, model, monkeypatch):
    remote = tmp_path / "remote"
    slices = {"int4": tmp_path / "job-int4", "fp32": tmp_path / "job-fp32"}
    for root in slices.values():
        machine(root, model, str(remote), precisions=("int4", "fp32"))
    jobs = [doit_process(root, f"quantize:a-{precision}-onnx") for precision, root in slices.items()]
    for job in jobs:
        output = job.communicate(timeout=600)[0]
        assert job.returncode == 0, output

    final = machine(tmp_path / "final", model, str(remote), precisions=("int4", "fp32"))
    (final / "slices").mkdir()
    for precision, root in slices.items():
        shutil.copy(root / "artifacts.lock", final / "slices" / f"{precision}.lock")
    run = run_doit(final, "assemble")
    assert run.code == 0, run.output
    assert "2 entries taken from them: a-fp32-onnx, a-int4-onnx" in run.output
    lock = Lockfile(final / "artifacts.lock").read()
    assert lock.artifacts["a-int4-onnx"] == Lockfile(slices["int4"] / "artifacts.lock").get("a-int4-onnx")
    assert lock.artifacts["a-fp32-onnx"] == Lockfile(slices["fp32"] / "artifacts.lock").get("a-fp32-onnx")

    monkeypatch.setenv("PHIBUILD_RESTORE_ONLY", "1")
    restored = run_doit(final)
    assert restored.code == 0 and restored.built == [], restored.output
    assert Lockfile(final / "artifacts.lock").read() == lock


def test_restore_only_refuses_to_build(tmp_path, model, monkeypatch):
    root = machine(tmp_path / "p", model, str(tmp_path / "empty-remote"))
    monkeypatch.setenv("PHIBUILD_RESTORE_ONLY", "1")
    run = run_doit(root)
    assert run.code != 0 and run.built == []
    remote = tmp_path / "empty-remote"
    assert f"is not in the store or the remote {remote}, and PHIBUILD_RESTORE_ONLY is set" in run.output


def test_assemble_refuses_slices_whose_artifacts_were_not_pushed(tmp_path, model):
    job = machine(tmp_path / "job", model, None)
    assert run_doit(job).code == 0
    final = machine(tmp_path / "final", model, str(tmp_path / "remote"))
    (final / "slices").mkdir()
    shutil.copy(job / "artifacts.lock", final / "slices" / "job.lock")
    run = run_doit(final, "assemble")
    assert run.code != 0
    assert "with the files its lock pins; did that job push" in run.output
    assert not (final / "artifacts.lock").exists()
