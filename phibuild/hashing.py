"""File and tree digests, with a persistent stat cache so that an unchanged file is never read twice.

xxh3-128 is the working digest (fast enough that reading the disk is the limit); sha256 is computed in the
same pass for outputs, because it is what people verify downloads with. A file's cached digest is trusted
while its (size, mtime_ns, inode, device) is unchanged. An entry is only written when the file's mtime is
older than ``RACY_SECONDS`` at hashing time, so a write that lands in the same clock tick as the hash can't
hide behind an unchanged stat (git's "racy clean" problem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .reading import open_regular

CHUNK = 1024 * 1024  # few syscalls, and small enough to stay in the L2 cache while xxh3 reads it
PROGRESS_ABOVE = 256 * 1024 * 1024
RACY_SECONDS = 2.0
RECENT_SECONDS = 0.1  # remembered within a process: any later write shows in an mtime of 0.1 s resolution

# Bytes read by this process to hash files: lets tests and benchmarks prove a no-op reads nothing.
bytes_read = 0
_counter_lock = threading.Lock()


@dataclass(frozen=True)
class FileDigest:
    """A file's size and digests, as manifests and artifacts.lock record them (sha256 for people, who
    verify downloads with it; xxh3-128 for phibuild)."""

    size: int
    xxh3_128: str
    sha256: str | None = None

    @classmethod
    def from_dict(cls, data: object, where: str) -> FileDigest:
        from . import validate as v

        table = {"size": v.Field(v.count), "xxh3_128": v.Field(v.key), "sha256": v.Field(v.sha256)}
        return cls(**v.fields(data, table, where))

    def to_dict(self) -> dict:
        return {"size": self.size, "xxh3_128": self.xxh3_128, "sha256": self.sha256}

    def same_content(self, other: FileDigest) -> bool:
        """Equal size and xxh3 (sha256 is compared where both have one)."""
        return (self.size, self.xxh3_128) == (other.size, other.xxh3_128) and (
            self.sha256 is None or other.sha256 is None or self.sha256 == other.sha256)


def hash_file(path: Path, with_sha256: bool = False, copy_to: Path | None = None) -> FileDigest:
    """Read ``path`` once in 1 MiB chunks and return its xxh3-128 (and sha256 if asked); with ``copy_to``,
    write what was read there too, so that a copy is checked in the same pass that makes it. Only a regular file
    is read (``reading.open_regular``): a FIFO or a device is an OSError, not a hang."""
    global bytes_read
    from tqdm import tqdm  # here, not at the top: a no-op run hashes nothing and need not import it

    xxh = xxhash.xxh3_128()
    sha = hashlib.sha256() if with_sha256 else None
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(open(open_regular(path), "rb", buffering=0))  # never a FIFO or a device
        size = os.fstat(handle.fileno()).st_size
        buffer = bytearray(min(CHUNK, max(size, 1)))
        view = memoryview(buffer)
        done = 0
        out = stack.enter_context(open(copy_to, "xb")) if copy_to is not None else None
        bar = stack.enter_context(tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {Path(path).name}",
                                       disable=size < PROGRESS_ABOVE, leave=False))
        while n := handle.readinto(buffer):
            xxh.update(view[:n])
            if sha is not None:
                sha.update(view[:n])
            if out is not None:
                out.write(view[:n])
            done += n
            bar.update(n)
    with _counter_lock:
        bytes_read += done
    return FileDigest(done, xxh.hexdigest(), sha.hexdigest() if sha else None)


def digest_files(directory: Path) -> dict[str, FileDigest]:
    """``{relative posix path: digest}`` of every file under ``directory``, read in full (with sha256)."""
    files = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        files[path.relative_to(directory).as_posix()] = hash_file(path, with_sha256=True)
    return files


def digest_json(value: object) -> str:
    """xxh3-128 of canonical JSON: sorted keys, no whitespace, UTF-8."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return xxhash.xxh3_128_hexdigest(text.encode())


def digest_tree(files: dict[str, str]) -> str:
    """One digest for a set of files, given ``{relative posix path: xxh3}``; independent of listing order."""
    return digest_json(sorted(files.items()))


class StatCache:
    """Digests keyed by absolute path, valid while the file's stat signature is unchanged.

    Backed by SQLite so that several doit processes (``doit -n 2``) can share it safely.
    """

    def __init__(self, path: Path):
        self._db, self.writable = _connect(path)
        self._lock = threading.Lock()
        self._recent: dict[str, tuple[tuple[int, int, int, int], FileDigest]] = {}

    def close(self) -> None:
        self._db.close()

    def record(self, path: Path, digest: FileDigest) -> None:
        """Trust ``digest`` for ``path`` as it is now: for files phibuild itself just wrote and hashed."""
        st = Path(path).stat()
        self._persist(os.path.abspath(path), (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev), digest)

    def _persist(self, path: str, signature: tuple[int, int, int, int], digest: FileDigest) -> None:
        """Remember a digest; a cache that cannot be written (a full disk) only costs a read next time."""
        if not self.writable:
            return
        with self._lock, contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (path, *signature, digest.xxh3_128, digest.sha256))

    def forget(self, directory: Path) -> None:
        """Drop what is known of the files under ``directory`` (removed: their rows would only take space)."""
        prefix = os.path.abspath(directory).rstrip(os.sep) + os.sep
        with self._lock, contextlib.suppress(sqlite3.OperationalError):
            if self.writable:
                self._db.execute("DELETE FROM files WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
        self._recent = {path: known for path, known in self._recent.items() if not path.startswith(prefix)}

    def digest(self, path: Path, with_sha256: bool = False, before_reading=None) -> FileDigest:
        """The file's digest, from the cache when its stat is unchanged, else by reading it once.

        This process also remembers the digests of files too freshly written to be persisted, once they are
        ``RECENT_SECONDS`` old (it waits for a file younger than that): a run right after a checkout or a
        ``touch`` reads each file once, not once per target using it. ``before_reading(path)`` runs first whenever
        the file must be read.
        """
        path = Path(os.path.abspath(path))
        st = path.stat()
        young = RECENT_SECONDS - (time.time_ns() - st.st_mtime_ns) / 1e9
        if 0 < young <= RECENT_SECONDS:  # written a moment ago: wait, so that the digest can be remembered
            time.sleep(young)
            st = path.stat()
        signature = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        known = self._recent.get(str(path))
        if known and known[0] == signature and (known[1].sha256 or not with_sha256):
            return known[1]
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, ino, dev, xxh3, sha256 FROM files WHERE path = ?", (str(path),)
            ).fetchone()
        if row and tuple(row[:4]) == signature and (row[5] or not with_sha256):
            return FileDigest(row[0], row[4], row[5])
        if before_reading is not None:  # a check that costs little and spares reading a file that is not one
            before_reading(path)
        started = time.time_ns()
        result = hash_file(path, with_sha256)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns, after.st_ino, after.st_dev) != signature:
            return result  # written to while we read it: trust nothing
        age = (started - st.st_mtime_ns) / 1e9
        if age > RACY_SECONDS:
            self._persist(str(path), signature, result)
        elif age >= RECENT_SECONDS:
            self._recent[str(path)] = (signature, result)
        return result


def _connect(path: Path) -> tuple[sqlite3.Connection, bool]:
    """The cache's database and whether it can be written. In a store on read-only media (or one this user
    may not write), what the cache holds is still used, opened immutable, and nothing new is remembered."""
    db = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            raise OSError(f"{path} is not a regular file")  # a FIFO there would hang SQLite's open
        db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        _setup(db)
        return db, True
    except sqlite3.DatabaseError as exc:
        if db is not None:
            db.close()
        if "locked" in str(exc):
            raise
        if not isinstance(exc, sqlite3.OperationalError) and path.is_file():  # not a database: only a cache, lost
            with contextlib.suppress(OSError):
                path.unlink()
                return _connect(path)
    except OSError:
        if db is not None:
            db.close()
    if path.is_file():
        db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True, check_same_thread=False)
        try:
            db.execute("SELECT count(*) FROM files").fetchone()
            return db, False
        except sqlite3.Error:
            db.close()
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    _setup(db)
    return db, True  # in memory: remembered for this process only


def _setup(db: sqlite3.Connection, attempts: int = 200) -> None:
    """WAL mode and the table. Switching to WAL does not wait on SQLite's busy timeout: when two processes open
    a new cache at once, one is told "database is locked" and tries again."""
    for attempt in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
                " ino INTEGER, dev INTEGER, xxh3 TEXT, sha256 TEXT)"
            )
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)
