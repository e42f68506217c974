"""Digests and the stat cache: an unchanged file is never read twice, a touched one is read once."""

import hashlib
import os
import time

import xxhash

from phibuild import hashing
from phibuild.hashing import StatCache, digest_tree, hash_file


def _old_file(path, data: bytes):
    """A file whose mtime is well in the past, so the stat cache may trust it (see RACY_SECONDS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    past = time.time() - 60
    os.utime(path, (past, past))
    return path


def test_hash_file_gives_xxh3_128_and_sha256_in_one_pass(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = hash_file(_old_file(tmp_path / "w.bin", data), with_sha256=True)
    assert digest.size == len(data)
    assert digest.xxh3_128 == xxhash.xxh3_128_hexdigest(data)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()


def test_unchanged_file_is_read_once_and_a_touched_one_once_more(tmp_path):
    cache = StatCache(tmp_path / "cache.sqlite")
    path = _old_file(tmp_path / "w.bin", os.urandom(100_000))
    before = hashing.bytes_read
    first = cache.digest(path)
    assert hashing.bytes_read - before == 100_000
    assert cache.digest(path) == first
    assert StatCache(tmp_path / "cache.sqlite").digest(path) == first  # persists across processes
    assert hashing.bytes_read - before == 100_000

    os.utime(path, (time.time() - 30, time.time() - 30))  # touched: same bytes, new mtime
    assert cache.digest(path).xxh3_128 == first.xxh3_128
    assert cache.digest(path).xxh3_128 == first.xxh3_128
    assert hashing.bytes_read - before == 200_000


def test_a_changed_file_gets_a_new_digest(tmp_path):
    cache = StatCache(tmp_path / "cache.sqlite")
    path = _old_file(tmp_path / "w.bin", b"a" * 1000)
    first = cache.digest(path)
    _old_file(path, b"a" * 999 + b"b")
    assert cache.digest(path).xxh3_128 != first.xxh3_128


def test_a_file_written_just_now_is_hashed_once_it_is_safe_to_remember(tmp_path):
    """A write in the same clock tick as the hash could leave the stat unchanged: a file younger than
    RECENT_SECONDS is hashed only once it is that old, and then read once."""
    cache = StatCache(tmp_path / "cache.sqlite")
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"x" * 1000)
    written = path.stat().st_mtime_ns
    before = hashing.bytes_read
    cache.digest(path)
    assert time.time_ns() - written >= hashing.RECENT_SECONDS * 1e9
    cache.digest(path)
    assert hashing.bytes_read - before == 1000


def test_a_recent_file_is_read_once_per_process_and_not_persisted(tmp_path):
    """Written a second ago: safe to remember in this process (a later write changes its mtime), too young to
    persist, so that the targets of one run right after a checkout do not each read the model again."""
    cache = StatCache(tmp_path / "cache.sqlite")
    path = tmp_path / "recent.bin"
    path.write_bytes(b"x" * 1000)
    os.utime(path, (time.time() - 1, time.time() - 1))
    before = hashing.bytes_read
    cache.digest(path)
    cache.digest(path)
    assert hashing.bytes_read - before == 1000
    StatCache(tmp_path / "cache.sqlite").digest(path)
    assert hashing.bytes_read - before == 2000


def test_tree_digest_ignores_listing_order():
    files = {"b/model.safetensors": "1" * 32, "config.json": "2" * 32, "a.json": "3" * 32}
    assert digest_tree(files) == digest_tree(dict(reversed(list(files.items()))))
    assert digest_tree(files) != digest_tree({**files, "a.json": "4" * 32})
    assert digest_tree(files) != digest_tree({"renamed.json" if k == "a.json" else k: v for k, v in files.items()})


def _open_and_hash(cache_path, file_path, start, results) -> None:
    start.wait()
    results.put(StatCache(cache_path).digest(file_path).xxh3_128)


def test_processes_opening_a_new_cache_at_once_all_succeed(tmp_path):
    """Opening a new cache switches it to WAL, which does not wait for a busy database: racing processes
    must retry rather than fail ("database is locked", seen with two doit processes building one target)."""
    import multiprocessing

    path = _old_file(tmp_path / "w.bin", b"w" * 1000)
    results = multiprocessing.Queue()
    for round_ in range(20):
        start = multiprocessing.Barrier(4)
        workers = [multiprocessing.Process(target=_open_and_hash,
                                           args=(tmp_path / f"c{round_}.sqlite", path, start, results))
                   for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert {results.get() for _ in range(80)} == {xxhash.xxh3_128_hexdigest(b"w" * 1000)}


def test_a_file_dated_in_the_future_is_hashed_without_waiting(tmp_path, monkeypatch):
    """Clock skew, tar or NFS can date a file ahead: it is hashed at once, and remembered nowhere."""
    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(1000))
    ahead = time.time() + 30
    os.utime(path, (ahead, ahead))
    waits = []
    monkeypatch.setattr(hashing.time, "sleep", waits.append)
    cache = StatCache(tmp_path / "cache.sqlite")
    before = hashing.bytes_read
    assert cache.digest(path) == cache.digest(path) == hash_file(path)
    assert waits == []
    assert hashing.bytes_read - before == 3000  # not trusted: its stat may not change on the next write


def test_forgetting_a_directory_drops_its_files_only(tmp_path):
    cache = StatCache(tmp_path / "cache.sqlite")
    gone, kept = _old_file(tmp_path / "a" / "w.bin", b"a"), _old_file(tmp_path / "ab" / "w.bin", b"b")
    cache.digest(gone), cache.digest(kept)
    cache.forget(tmp_path / "a")
    before = hashing.bytes_read
    cache.digest(kept)
    assert hashing.bytes_read == before  # "ab/" is not under "a/"
    cache.digest(gone)
    assert hashing.bytes_read == before + 1
