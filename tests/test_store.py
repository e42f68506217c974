"""The content-addressed store: atomic publish, read-only entries, visible copies, damage detection."""

import dataclasses
import os
import subprocess
import sys

from phibuild import hashing
from phibuild.hashing import hash_file
from phibuild.records import KeyParts, Manifest, Smoke, Toolchain
from phibuild.store import Store

PARTS = KeyParts("ab" * 16, "onnx", Toolchain("onnx", "cpython-3.11", {}), "int4", {}, "2.1", {})


def _parts(n: int) -> KeyParts:
    return dataclasses.replace(PARTS, params={"n": n})


def _publish(store: Store, parts: KeyParts, files: dict[str, bytes]):
    with store.building() as build:
        (build / "artifact").mkdir()
        digests = {}
        for name, data in files.items():
            path = build / "artifact" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            digests[name] = hash_file(path, with_sha256=True)
        return store.publish(build, Manifest(parts.key, "t", parts, digests, Smoke("ok: 8 tokens")))


def test_publish_moves_a_sealed_read_only_entry_under_its_key(tmp_path):
    store = Store(tmp_path / "store")
    key = _parts(1).key
    entry = _publish(store, _parts(1), {"model.bin": b"weights", "sub/tok.json": b"{}"})
    assert entry.directory == tmp_path / "store" / "objects" / key[:2] / key
    assert (entry.artifact / "sub" / "tok.json").read_bytes() == b"{}"
    assert oct((entry.artifact / "model.bin").stat().st_mode & 0o777) == "0o444"
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert store.get(key).files == entry.files
    assert store.find(key, None).files == entry.files
    assert store.get(_parts(2).key) is None


def test_second_publish_of_a_key_keeps_the_first(tmp_path):
    store = Store(tmp_path / "store")
    first = _publish(store, _parts(1), {"model.bin": b"one"})
    second = _publish(store, _parts(1), {"model.bin": b"one"})
    assert second.files == first.files
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_visible_copy_links_files_and_is_checked_without_reading(tmp_path):
    store = Store(tmp_path / "store")
    entry = _publish(store, _parts(1), {"model.bin": b"w" * 5000, "model.onnx.data": b"d" * 5000})
    visible = tmp_path / "build" / "t"
    how = store.show(entry, visible, unlinkable=("*.onnx.data",))
    assert how["model.onnx.data"] in ("copy", "reflink")  # never a hardlink; on ext4 (no reflinks) a copy
    assert (visible / "model.bin").stat().st_ino == (entry.artifact / "model.bin").stat().st_ino
    assert (visible / "model.onnx.data").stat().st_nlink == 1
    before = hashing.bytes_read
    assert store.visible_matches(entry, visible)
    assert hashing.bytes_read == before

    os.chmod(visible / "model.onnx.data", 0o644)
    (visible / "model.onnx.data").write_bytes(b"x" * 5000)
    assert not store.visible_matches(entry, visible)
    store.show(entry, visible, unlinkable=("*.onnx.data",))  # repaired in place by rename
    assert store.visible_matches(entry, visible)
    assert [p.name for p in visible.parent.iterdir()] == ["t"]


def test_damaged_store_file_is_found(tmp_path):
    store = Store(tmp_path / "store")
    entry = _publish(store, _parts(1), {"model.bin": b"w" * 5000, "config.json": b"{}"})
    assert store.damaged_files(entry) == []
    path = entry.artifact / "model.bin"
    os.chmod(path, 0o644)
    path.write_bytes(b"w" * 4999 + b"x")
    (entry.artifact / "config.json").unlink()
    assert store.damaged_files(entry) == ["config.json", "model.bin"]
    assert store.find(entry.key, None) is None  # damage is removed, to be built again
    assert not entry.directory.exists()


def test_left_overs_of_dead_builds_are_removed(tmp_path):
    store = Store(tmp_path / "store")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "store" / "tmp" / f"{dead.stdout.strip()}-0123abcd"
    (stale / "artifact").mkdir(parents=True)
    (stale / "artifact" / "half.bin").write_bytes(b"half")
    stranger = tmp_path / "store" / "tmp" / f"{dead.stdout.strip()}-notes"  # not a name phibuild gives: kept
    stranger.mkdir()
    with store.building() as mine:
        assert not stale.exists() and stranger.exists()
        assert mine.exists() and mine.name.startswith(f"{os.getpid()}-")


def test_visible_artifacts_get_the_permissions_of_any_new_directory(tmp_path):
    """Others who may read the project may read its build/ (mkdtemp's 0700 would shut them out)."""
    store = Store(tmp_path / "store")
    entry = _publish(store, _parts(1), {"model.bin": b"w", "sub/tok.json": b"{}"})
    old = os.umask(0o022)
    try:
        store.show(entry, tmp_path / "build" / "t")
    finally:
        os.umask(old)
    assert oct((tmp_path / "build" / "t").stat().st_mode & 0o777) == "0o755"
    assert not [p.name for p in (tmp_path / "build").iterdir() if p.name != "t"]  # no staging left behind
