"""Hub models, driven through the real huggingface_hub client and phibuild code against a fake hub on
loopback (tests/fakehub.py): resolving and pinning a commit, downloading only the build files, resuming a
broken download, refusing corrupted weights, and a clear error when the hub can't be reached.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import closed_port, copy_model, run_doit, use_endpoint, write_project
from fakehub import FakeHub
from huggingface_hub import constants
from safetensors.numpy import save

from phibuild.build import build
from phibuild.catalog import ModelSpec
from phibuild.errors import SourceError
from phibuild.hashing import StatCache
from phibuild.lockfile import Lockfile
from phibuild.project import Project
from phibuild.sources import digest_directory, fetch, local_source, resolve_revision
from phibuild.store import Store

REPO_ID = "me/phi3-tiny"
TARGET = "my-phi-int4-onnx"
# In the repo beside the checkpoint, as on the real hub; a build reads none of them.
NOT_FOR_BUILDS = {
    "README.md": b"# phi3-tiny\n",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "original/consolidated.00.pth": b"\x80\x02 a PyTorch pickle the build never reads",
}


@pytest.fixture
def local(tmp_path: Path) -> Path:
    """A copy of the embedded phi3-tiny: what the fake hub serves, and the local twin to compare with."""
    return copy_model("phi3-tiny", tmp_path / "local")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[StatCache]:
    stat = StatCache(tmp_path / "statcache.sqlite")
    yield stat
    stat.close()


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def retrained(weights: bytes) -> bytes:
    """The same safetensors checkpoint with its last byte (part of a tensor) changed: other weights."""
    return weights[:-1] + bytes([weights[-1] ^ 1])


def hub_project(root: Path) -> Path:
    model = f'[tool.phibuild.model.my-phi]\nrepo = "{REPO_ID}"\n'
    return write_project(root, ["my-phi"], ["onnx"], ["int4"], extra=model)


def test_fetch_downloads_only_the_build_files_of_the_resolved_commit(
        hub: FakeHub, local: Path, cache: StatCache) -> None:
    """A hub model is the same source as the same files on disk, and README or original/*.pth never move."""
    commit = hub.push(REPO_ID, {**tree(local), **NOT_FOR_BUILDS})
    spec = ModelSpec("my-phi", repo=REPO_ID)
    assert resolve_revision(spec) == commit

    source = fetch(spec, commit, cache)
    assert source.revision == commit
    assert source.files == digest_directory(local, cache)
    assert source.digest == local_source(ModelSpec("twin", path=local), cache).digest
    assert sorted(r.filename for r in hub.downloads()) == sorted(tree(local))  # each build file, once
    assert {r.revision for r in hub.log if r.filename} == {commit}
    assert not {r.filename for r in hub.log} & set(NOT_FOR_BUILDS)

    hub.clear_log()
    assert fetch(spec, commit, cache) == source
    assert hub.downloads() == []  # the commit is in the Hugging Face cache: nothing is downloaded again


def test_a_pinned_commit_is_what_later_builds_download(
        hub: FakeHub, local: Path, tmp_path: Path) -> None:
    """The lock pins the commit "main" had at the first build: moving "main" changes nothing, and a rebuild
    downloads that commit again, not the new one."""
    files = tree(local)
    pinned = hub.push(REPO_ID, files)
    root = hub_project(tmp_path / "project")
    first = run_doit(root)
    assert first.code == 0, first.output
    assert first.built == [TARGET]
    entry = Lockfile(root / "artifacts.lock").get(TARGET)
    assert entry.revision == pinned

    moved = hub.push(REPO_ID, {**files, "model.safetensors": retrained(files["model.safetensors"])})
    assert moved != pinned
    hub.clear_log()
    again = run_doit(root)
    assert (again.code, again.built) == (0, [])
    assert hub.log == []  # not even a look at "main": the lock is enough to know the target is fresh

    store = Store(root / ".phibuild")
    store.remove(entry.key)
    store.statcache.close()
    shutil.rmtree(root / "build" / TARGET)
    shutil.rmtree(tmp_path / "hf" / "hub")  # so the rebuild really downloads
    rebuilt = run_doit(root)
    assert rebuilt.code == 0, rebuilt.output
    assert rebuilt.built == [TARGET]
    assert {r.revision for r in hub.log if r.repo} == {pinned}
    assert sorted(r.filename for r in hub.downloads()) == sorted(files)
    assert hub.bytes_served("model.safetensors") == len(files["model.safetensors"])
    assert Lockfile(root / "artifacts.lock").get(TARGET) == entry  # same revision, key and artifact digests


def test_a_broken_download_resumes_where_it_stopped(hub: FakeHub, local: Path, cache: StatCache) -> None:
    """huggingface_hub retries a dropped transfer with a Range request from what it had written. It writes in
    10 MiB chunks, so the weights here are larger than that, for the resume to start past byte 0."""
    rng = np.random.default_rng(0)
    weights = save({"weight": rng.standard_normal(3 * 2**20, dtype=np.float32)})  # 12 MiB
    commit = hub.push(REPO_ID, {"config.json": (local / "config.json").read_bytes(), "model.safetensors": weights})
    hub.drop_after(REPO_ID, "model.safetensors", 11 * 2**20)

    source = fetch(ModelSpec("my-phi", repo=REPO_ID), commit, cache)
    dropped, resumed = hub.downloads("model.safetensors")
    assert (dropped.range_start, dropped.sent) == (None, 11 * 2**20)
    assert resumed.status == 206
    assert 0 < resumed.range_start <= dropped.sent
    assert resumed.sent == len(weights) - resumed.range_start
    assert (source.directory / "model.safetensors").read_bytes() == weights


def test_corrupted_weights_fail_the_build_and_leave_no_trace(hub: FakeHub, local: Path, tmp_path: Path) -> None:
    """Weights that don't match the sha256 the hub publishes are refused before anything is built or locked."""
    hub.push(REPO_ID, tree(local))
    hub.corrupt(REPO_ID, "model.safetensors")
    root = hub_project(tmp_path / "project")
    project = Project.load(root)
    try:
        with pytest.raises(SourceError, match=r"model\.safetensors does not match the hub's sha256"):
            build(project, project.target(TARGET))
    finally:
        project.store.statcache.close()
    assert hub.downloads("model.safetensors")  # it was downloaded, then refused
    assert not (root / "artifacts.lock").exists()
    assert not (root / ".phibuild" / "objects").exists()
    assert not (root / "build").exists()


def test_a_corrupted_download_is_removed_so_the_next_fetch_gets_it_anew(
        hub: FakeHub, local: Path, cache: StatCache) -> None:
    """huggingface_hub would link the same bad blob again: phibuild removes it with the snapshot's link."""
    commit = hub.push(REPO_ID, tree(local))
    hub.corrupt(REPO_ID, "model.safetensors")
    spec = ModelSpec("my-phi", repo=REPO_ID)
    with pytest.raises(SourceError, match="it was removed from the Hugging Face cache"):
        fetch(spec, commit, cache)
    hub.repair(REPO_ID, "model.safetensors")
    source = fetch(spec, commit, cache)
    assert (source.directory / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()


def test_a_changed_revision_setting_is_built_and_pinned(
        hub: FakeHub, local: Path, tmp_path: Path) -> None:
    """Asking for another revision in pyproject.toml makes the target stale, though a commit is pinned."""
    files = tree(local)
    hub.push(REPO_ID, files)
    dev = hub.push(REPO_ID, {**files, "model.safetensors": retrained(files["model.safetensors"])}, branch="dev")
    root = hub_project(tmp_path / "project")
    assert run_doit(root).code == 0

    write_project(root, ["my-phi"], ["onnx"], ["int4"],
                  extra=f'[tool.phibuild.model.my-phi]\nrepo = "{REPO_ID}"\nrevision = "dev"\n')
    info = run_doit(root, "info", f"quantize:{TARGET}")
    assert f"model source changed: hf:{REPO_ID} -> hf:{REPO_ID}@dev" in info.output
    run = run_doit(root)
    assert run.code == 0 and run.built == [TARGET], run.output
    entry = Lockfile(root / "artifacts.lock").get(TARGET)
    assert (entry.revision, entry.source) == (dev, f"hf:{REPO_ID}@dev")


def test_a_hub_that_never_answers_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        use_endpoint(f"http://127.0.0.1:{silent.getsockname()[1]}", tmp_path / "hf", monkeypatch)
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        started = time.monotonic()
        with pytest.raises(SourceError, match="cannot fetch my-phi"):
            resolve_revision(ModelSpec("my-phi", repo=REPO_ID))
        assert time.monotonic() - started < 10


def test_an_unreachable_hub_fails_fast_and_says_how_to_fix_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_endpoint(f"http://127.0.0.1:{closed_port()}", tmp_path / "hf", monkeypatch)
    started = time.monotonic()
    with pytest.raises(SourceError) as failure:
        resolve_revision(ModelSpec("my-phi", repo=REPO_ID))
    assert time.monotonic() - started < 5
    message = str(failure.value)
    for hint in ("my-phi", REPO_ID, "network", "HF_TOKEN", "HF_ENDPOINT", "[tool.phibuild.model.my-phi] path = "):
        assert hint in message, message


def test_a_newly_pinned_commit_is_built_from_its_own_weights(
        hub: FakeHub, local: Path, tmp_path: Path) -> None:
    """Pinning another full commit in pyproject.toml builds that commit's weights, not the locked digest."""
    files = tree(local)
    first = hub.push(REPO_ID, files)
    second = hub.push(REPO_ID, {**files, "model.safetensors": retrained(files["model.safetensors"])})

    def pin(commit: str) -> dict:
        write_project(tmp_path / "project", ["my-phi"], ["onnx"], ["int4"],
                      extra=f'[tool.phibuild.model.my-phi]\nrepo = "{REPO_ID}"\nrevision = "{commit}"\n')
        run = run_doit(tmp_path / "project")
        assert run.code == 0 and run.built == [TARGET], run.output
        return Lockfile(tmp_path / "project" / "artifacts.lock").get(TARGET)

    old, new = pin(first), pin(second)
    assert (old.revision, new.revision) == (first, second)
    assert new.parts.source != old.parts.source
    assert new.key != old.key
