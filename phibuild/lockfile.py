"""``artifacts.lock``: what each artifact was built from and what it contains, in TOML.

One table per artifact under ``[artifacts.<target>]``, and one per toolchain under ``[toolchains.<id>]``,
keys sorted, so the file diffs and merges well. Every write re-reads the file under an exclusive file lock,
changes one entry and replaces the file by rename, so parallel tasks (``doit -n 2``) never lose each
other's entries and a crash never leaves half a file (a kill leaves at most a hidden temporary file, which
the next write removes). Every lock read, the project's own or a CI slice's, is validated entry by entry
(``records.Lock``) before anything uses it.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import tomli_w

from . import reading, validate
from .errors import LockError, file_system_error
from .records import Lock, LockEntry, Smoke
from .store import write_file

HEADER = (
    "# artifacts.lock: written by phibuild after every finished build; commit it.\n"
    "# Each [artifacts] table pins one artifact: its source, toolchain, parameters, cache key and output files;\n"
    "# each [toolchains] table the exact package versions a backend built with.\n\n"
)
CONFLICT = re.compile(r"^(<<<<<<<|=======|>>>>>>>)( |$)", re.MULTILINE)


class Lockfile:
    def __init__(self, path: Path, mutex: Path | None = None):
        """``mutex``: the file to lock writers on (default beside the lock); a project keeps it in its store,
        out of the way of ``git status``."""
        self.path = path
        self._mutex = mutex or path.with_name(path.name + ".lock")
        self._parsed: tuple[tuple[int, int, int], Lock] | None = None

    def read(self) -> Lock:
        """The whole lock; an absent file is an empty lock. Parsed once per version of the file (every write
        replaces it, so its inode changes): a no-op run asks for each target's entry."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return Lock({})
        except OSError as exc:
            raise file_system_error(exc, "reading the lock") from None
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._parsed is None or self._parsed[0] != signature:
            self._parsed = (signature, parse(self._text(), self.path))
        return self._parsed[1]

    def get(self, name: str) -> LockEntry | None:
        return self.read().artifacts.get(name)

    def put(self, name: str, entry: LockEntry | None) -> None:
        """Set (or with ``None`` remove) one entry, atomically and safely against concurrent writers."""
        with self._writers():
            artifacts = dict(parse(self._text(), self.path).artifacts) if self.path.exists() else {}
            if entry is None:
                artifacts.pop(name, None)
            else:
                artifacts[name] = entry
            self._write(Lock(artifacts))

    def put_all(self, lock: Lock) -> None:
        """Replace the whole lock in one atomic write (``doit assemble``); what is there must be a lock too."""
        with self._writers():
            if self.path.exists():
                parse(self._text(), self.path)
            self._write(lock)

    def _text(self) -> str:
        """The file's text, read bounded (``reading``): a FIFO, a device or a file larger than any lock is refused."""
        try:
            return reading.read_text(self.path, "lock")
        except reading.Unreadable as exc:
            raise LockError(f"{exc}: restore it from git") from None
        except OSError as exc:
            raise file_system_error(exc, "reading the lock") from None

    @contextlib.contextmanager
    def _writers(self) -> Iterator[None]:
        """The inter-process lock writers hold (filelock is imported here: a no-op run writes nothing). Where
        the mutex cannot be made (a read-only store), the write goes on unguarded rather than not at all."""
        from filelock import FileLock

        try:
            self._mutex.parent.mkdir(parents=True, exist_ok=True)
            mutex = FileLock(str(self._mutex))
            mutex.acquire()
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise file_system_error(exc, "locking the lock for writing") from None
            yield
            return
        try:
            yield
        finally:
            mutex.release()

    def _write(self, lock: Lock) -> None:
        try:
            if self.path.exists() and not self.path.stat().st_mode & 0o222:
                raise LockError(f"{self.path} is read-only, so the build was not pinned in it: make it writable "
                                f"(chmod u+w {self.path.name}) and build again, or set PHIBUILD_FROZEN=1 to check "
                                "against it without writing")
            text = HEADER + tomli_w.dumps(_sorted(lock.to_dict()))
            try:  # written only as it will be read back: never a lock phibuild itself refuses
                parse(text, self.path)
            except LockError as exc:
                raise LockError(f"not written, as it would not read back: {exc}") from None
            self.path.parent.mkdir(parents=True, exist_ok=True)  # inside the project (config._check_places)
            write_file(self.path, text)
        except OSError as exc:
            raise file_system_error(exc, f"writing {self.path.name}") from None


def merge(base: Lock, slices: dict[str, Lock]) -> Lock:
    """One lock from ``base`` (the committed one) and the locks several CI jobs wrote from it (by name).

    A target takes the entry a slice changed; slices that changed it differently are a conflict. Where the smoke
    check ran (here, or on the machine a slice pulled the artifact from) is provenance, not a difference: of
    entries that agree on everything else, the one whose slice built the artifact is taken, else a vouched one.
    """
    merged = dict(base.artifacts)
    for target in sorted({name for lock in slices.values() for name in lock.artifacts}):
        changed: dict[str, list[tuple[str, LockEntry]]] = {}
        for slice_name, lock in sorted(slices.items()):
            entry = lock.artifacts.get(target)
            if entry is not None and entry != base.artifacts.get(target):
                changed.setdefault(_canonical(entry), []).append((slice_name, entry))
        if len(changed) > 1:
            names = ", ".join(found[0][0] for found in changed.values())
            raise LockError(f"{target}: the slices {names} built it differently (different keys or files); "
                            "build it in one slice only")
        if changed:
            candidates = [entry for _, entry in next(iter(changed.values()))]
            merged[target] = min(candidates, key=lambda entry: (entry.smoke.pulled_from is not None,
                                                                entry.smoke.unverified))
    return Lock(merged)


def _canonical(entry: LockEntry) -> str:
    """The entry without the provenance of its smoke check."""
    return tomli_w.dumps(_sorted(replace(entry, smoke=Smoke(entry.smoke.result)).to_dict()))


def parse(text: str, path: Path) -> Lock:
    conflict = CONFLICT.search(text)
    if conflict:
        line = text.count("\n", 0, conflict.start()) + 1
        raise LockError(
            f"{path}:{line}: unresolved merge conflict marker {conflict.group(1)!r}. Resolve it by keeping "
            "either side of each conflicting artifact table (or delete those tables and rebuild them)."
        )
    if not text.strip():
        return Lock({})  # an empty file is an empty lock, as a missing one is
    try:
        data = reading.toml_data(text, str(path))
    except reading.Unreadable as exc:
        raise LockError(f"{exc}. Fix it by hand or restore it from git.") from None
    try:
        return Lock.from_dict(data, str(path))
    except validate.Invalid as exc:
        raise LockError(str(exc)) from None


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return value
