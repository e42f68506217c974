"""artifacts.lock: deterministic text, safe concurrent writers, clear errors for broken files."""

import multiprocessing
import os
import stat

import pytest

from phibuild.errors import LockError
from phibuild.hashing import FileDigest
from phibuild.lockfile import Lockfile
from phibuild.records import KeyParts, LockEntry, Smoke, Toolchain


def _entry(n: int) -> LockEntry:
    toolchain = Toolchain("onnx", "cpython-3.11", {"onnx": f"1.{n % 2}"})
    parts = KeyParts(f"{n:032x}", "onnx", toolchain, "int4", {"z": 1, "a": True}, "2.1", {"platform": "linux-x86_64"})
    return LockEntry(f"m{n}", f"embedded:m{n}", parts, parts.key,
                     {"model.onnx": FileDigest(n, "1" * 32, "0" * 64)}, Smoke("ok: 8 tokens"))


def test_same_entries_give_the_same_text_whatever_the_order(tmp_path):
    one, two = Lockfile(tmp_path / "one.lock"), Lockfile(tmp_path / "two.lock")
    for n in (1, 2, 3):
        one.put(f"t{n}", _entry(n))
    for n in (3, 1, 2):
        two.put(f"t{n}", _entry(n))
    assert one.path.read_text() == two.path.read_text()
    assert one.read().artifacts == {f"t{n}": _entry(n) for n in (1, 2, 3)}
    assert len(one.read().to_dict()["toolchains"]) == 2  # one table per distinct toolchain, shared by entries
    one.put("t2", None)
    assert set(one.read().artifacts) == {"t1", "t3"}


def _writer(path, start: int) -> None:
    lock = Lockfile(path)
    for n in range(start, start + 20):
        lock.put(f"t{n}", _entry(n))


def test_concurrent_writers_lose_no_entry(tmp_path):
    path = tmp_path / "artifacts.lock"
    workers = [multiprocessing.Process(target=_writer, args=(path, start)) for start in (0, 100)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert set(Lockfile(path).read().artifacts) == {f"t{n}" for n in [*range(20), *range(100, 120)]}
    assert not list(tmp_path.glob(".artifacts.lock*")), "temporary files left behind"


def test_merge_conflict_is_reported_with_its_line(tmp_path):
    lock = Lockfile(tmp_path / "artifacts.lock")
    lock.put("t1", _entry(1))
    lines = lock.path.read_text().splitlines()
    lines[6:6] = ["<<<<<<< HEAD", 'model = "mine"', "=======", 'model = "theirs"', ">>>>>>> branch"]
    lock.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LockError, match=r"artifacts.lock:7: unresolved merge conflict"):
        lock.read()


def test_broken_toml_is_a_clear_error(tmp_path):
    path = tmp_path / "artifacts.lock"
    path.write_text('version = 2\n[artifacts."t1"\nmodel = "x"\n')
    with pytest.raises(LockError, match=r"not valid TOML .*line 2"):
        Lockfile(path).read()


def test_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "artifacts.lock"
    path.write_text("version = 99\n")
    with pytest.raises(LockError, match="format version 99"):
        Lockfile(path).read()


def test_a_written_lock_is_readable_by_all_as_the_umask_allows_and_keeps_its_mode(tmp_path):
    lock = Lockfile(tmp_path / "artifacts.lock")
    old = os.umask(0o022)
    try:
        lock.put("t1", _entry(1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(lock.path.stat().st_mode) == 0o644
    lock.path.chmod(0o664)
    lock.put("t2", _entry(2))
    assert stat.S_IMODE(lock.path.stat().st_mode) == 0o664


def test_assemble_merges_provenance_and_keeps_real_differences_a_conflict():
    from dataclasses import replace

    from phibuild.lockfile import merge
    from phibuild.records import Lock

    built = _entry(1)
    pulled = replace(built, smoke=Smoke(built.smoke.result, "s3://team/phibuild"))
    for order in ((pulled, built), (built, pulled)):
        slices = {f"slice{i}": Lock({"t": entry}) for i, entry in enumerate(order)}
        assert merge(Lock({}), slices).artifacts["t"] == built  # the slice that built it, whichever comes first
    other = replace(built, files={"model.onnx": FileDigest(2, "2" * 32, "0" * 64)})
    with pytest.raises(LockError, match="built it differently"):
        merge(Lock({}), {"a": Lock({"t": built}), "b": Lock({"t": other})})


def test_an_empty_or_blank_lock_file_is_an_empty_lock(tmp_path):
    for text in ("", "\n\n  \n"):
        (tmp_path / "artifacts.lock").write_text(text)
        assert Lockfile(tmp_path / "artifacts.lock").read().artifacts == {}
