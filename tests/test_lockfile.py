"""artifacts.lock: deterministic text, safe concurrent writers, clear errors for broken files."""

import multiprocessing
import os
import stat

import pytest

from phibuild.errors import LockError
from phibuild.lockfile import Lockfile


def _entry(n: int) -> dict:
    return {"model": f"m{n}", "key": f"{n:032x}", "params": {"z": 1, "a": True},
            "files": {"model.onnx": {"size": n, "sha256": "0" * 64, "xxh3_128": "1" * 32}}}


def test_same_entries_give_the_same_text_whatever_the_order(tmp_path):
    one, two = Lockfile(tmp_path / "one.lock"), Lockfile(tmp_path / "two.lock")
    for n in (1, 2, 3):
        one.put(f"t{n}", _entry(n))
    for n in (3, 1, 2):
        two.put(f"t{n}", _entry(n))
    assert one.path.read_text() == two.path.read_text()
    assert one.read() == {f"t{n}": _entry(n) for n in (1, 2, 3)}
    one.put("t2", None)
    assert set(one.read()) == {"t1", "t3"}


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
    assert set(Lockfile(path).read()) == {f"t{n}" for n in [*range(20), *range(100, 120)]}
    assert not list(tmp_path.glob(".artifacts.lock.*")), "temporary files left behind"


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
    path.write_text('version = 1\n[artifacts."t1"\nmodel = "x"\n')
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
