"""``artifacts.lock``: what each artifact was built from and what it contains, in TOML.

One table per artifact under ``[artifacts."<target>"]``, keys sorted, so the file diffs and merges well.
Every write re-reads the file under an exclusive file lock, changes one entry and replaces the file by
rename, so parallel tasks (``doit -n 2``) never lose each other's entries and a crash never leaves half
a file.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
import uuid
from pathlib import Path

import tomli_w

from .errors import LockError

FORMAT = 1
HEADER = (
    "# artifacts.lock: written by phibuild after every finished build; commit it.\n"
    "# Each table pins one artifact: its source, toolchain, parameters, cache key and output files.\n\n"
)
CONFLICT = re.compile(r"^(<<<<<<<|=======|>>>>>>>)( |$)", re.MULTILINE)


class Lockfile:
    def __init__(self, path: Path, mutex: Path | None = None):
        """``mutex``: the file to lock writers on (default beside the lock); a project keeps it in its store,
        out of the way of ``git status``."""
        self.path = path
        self._mutex = mutex or path.with_name(path.name + ".lock")
        self._parsed: tuple[tuple[int, int, int], dict[str, dict]] | None = None

    def read(self) -> dict[str, dict]:
        """All entries by target name; an absent file is an empty lock."""
        return dict(self._entries())

    def get(self, name: str) -> dict | None:
        return self._entries().get(name)

    def _entries(self) -> dict[str, dict]:
        """Parsed once per version of the file (every write replaces it, so its inode changes): a no-op run
        asks for each target's entry and must not parse the whole lock each time."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._parsed is None or self._parsed[0] != signature:
            self._parsed = (signature, parse(self.path.read_text(), self.path))
        return self._parsed[1]

    def put(self, name: str, entry: dict | None) -> None:
        """Set (or with ``None`` remove) one entry, atomically and safely against concurrent writers."""
        with self._writers():
            entries = parse(self.path.read_text(), self.path) if self.path.exists() else {}
            if entry is None:
                entries.pop(name, None)
            else:
                entries[name] = entry
            self._write(entries)

    def put_all(self, entries: dict[str, dict]) -> None:
        """Replace the whole lock in one atomic write (``doit assemble``)."""
        with self._writers():
            self._write(entries)

    def _writers(self):
        """The inter-process lock writers hold (filelock is imported here: a no-op run writes nothing)."""
        from filelock import FileLock

        return FileLock(str(self._mutex))

    def _write(self, entries: dict[str, dict]) -> None:
        body = tomli_w.dumps(_sorted({"version": FORMAT, "artifacts": entries}))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
        try:
            with os.fdopen(fd, "w") as handle:
                if self.path.exists():
                    os.fchmod(handle.fileno(), stat.S_IMODE(self.path.stat().st_mode))
                handle.write(HEADER + body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def merge(base: dict[str, dict], slices: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """One lock from ``base`` (the committed one) and the locks several CI jobs wrote from it (by name).

    A target takes the entry a slice changed; slices that changed it differently are a conflict.
    """
    merged = dict(base)
    for target in sorted({name for entries in slices.values() for name in entries}):
        changed = {}
        for slice_name, entries in sorted(slices.items()):
            entry = entries.get(target)
            if entry is not None and entry != base.get(target):
                changed.setdefault(_canonical(entry), (slice_name, entry))
        if len(changed) > 1:
            names = ", ".join(slice_name for slice_name, _ in changed.values())
            raise LockError(f"{target}: the slices {names} built it differently (different keys or files); "
                            "build it in one slice only")
        if changed:
            merged[target] = next(iter(changed.values()))[1]
    return merged


def _canonical(entry: dict) -> str:
    return tomli_w.dumps(_sorted(entry))


def parse(text: str, path: Path) -> dict[str, dict]:
    conflict = CONFLICT.search(text)
    if conflict:
        line = text.count("\n", 0, conflict.start()) + 1
        raise LockError(
            f"{path}:{line}: unresolved merge conflict marker {conflict.group(1)!r}. Resolve it by keeping "
            "either side of each conflicting artifact table (or delete those tables and rebuild them)."
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"{path}: not valid TOML ({exc}). Fix the line by hand or restore it from git.") from None
    if data.get("version") != FORMAT:
        raise LockError(f"{path}: lock format version {data.get('version')!r}, this phibuild reads {FORMAT}")
    artifacts = data.get("artifacts", {})
    if not isinstance(artifacts, dict) or not all(isinstance(v, dict) for v in artifacts.values()):
        raise LockError(f"{path}: [artifacts] must hold one table per artifact")
    return artifacts


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return value
