"""The content-addressed store: each finished artifact lives under its cache key, read-only.

Layout under the store root (default ``.phibuild/``)::

    objects/ab/abcdef.../artifact/...   the backend's output files (mode 0444)
    objects/ab/abcdef.../manifest.json  their sizes and digests, and the smoke-check result
    tmp/<pid>-<random>/                 builds in progress; a killed build leaves only this behind
    locks/<key>.lock                    held while a key is being built, so two processes build it once
    locks/lockfile-<digest>.lock        held while artifacts.lock is rewritten
    statcache.sqlite                    see hashing.StatCache

An entry is built in ``tmp/``, verified, then published with one ``rename``: it is either complete or
absent. Users see artifacts under a stable path (``build/<target>/``), whose files are reflinks or
hardlinks of the store's, copied only where neither works.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .hashing import FileDigest, StatCache

FICLONE = 0x40049409  # linux/fs.h: share extents with another file (btrfs, xfs, ...)


@dataclass(frozen=True)
class Entry:
    """A published store entry."""

    key: str
    directory: Path
    manifest: dict

    @property
    def artifact(self) -> Path:
        return self.directory / "artifact"

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]


class Store:
    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        self.statcache = StatCache(root / "statcache.sqlite")

    def path(self, key: str) -> Path:
        return self.objects / key[:2] / key

    def get(self, key: str) -> Entry | None:
        directory = self.path(key)
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
        except FileNotFoundError:
            return None
        return Entry(key, directory, manifest)

    def damaged_files(self, entry: Entry, expected: dict[str, dict] | None = None) -> list[str]:
        """Files of ``entry`` that are missing or whose size or xxh3 differ from ``expected``
        (default: its own manifest). Unchanged files are judged by the stat cache, without reading."""
        damaged = []
        for name, want in sorted((expected or entry.files).items()):
            path = entry.artifact / name
            try:
                got = self.statcache.digest(path)
            except FileNotFoundError:
                damaged.append(name)
                continue
            if got.size != want["size"] or got.xxh3_128 != want["xxh3_128"]:
                damaged.append(name)
        return damaged

    def locked(self, key: str):
        """An inter-process lock for building ``key``: the second builder waits, then finds it published."""
        from filelock import FileLock  # here: a no-op run locks nothing

        self.locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.locks / f"{key}.lock"))

    def new_build_dir(self) -> Path:
        """A fresh directory in ``tmp/`` for one build; left-overs of dead builds are removed first."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._remove_dead_builds()
        return new_dir(self.tmp, f"{os.getpid()}-")

    def building(self) -> contextlib.AbstractContextManager[Path]:
        """A fresh build directory, removed if anything fails before it is published."""
        return removed_on_failure(self.new_build_dir())

    def _remove_dead_builds(self) -> None:
        for stale in self.tmp.iterdir():
            pid = stale.name.split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)  # another process may be removing it too

    def publish(self, build_dir: Path, key: str, manifest: dict) -> Entry:
        """Seal ``build_dir`` (holding ``artifact/``) and move it to its key in one rename.

        If another process published the same key first, its entry wins and ours is discarded:
        same key, same inputs, so either is right. The manifest's digests are those of files the caller
        has just hashed: they are recorded, so that later checks need not read the files again.
        """
        (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for path in sorted(build_dir.rglob("*")):
            if path.is_file():
                _fsync(path)
                path.chmod(0o444)
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(build_dir, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            _remove_tree(build_dir)
            return self.get(key)
        _fsync_dir(final.parent)
        entry = self.get(key)
        for name, digest in entry.files.items():
            self.statcache.record(entry.artifact / name, FileDigest(**digest))
        return entry

    def entries(self) -> list[Entry]:
        """Every published entry, by key."""
        return [entry for path in sorted(self.objects.glob("*/*")) if (entry := self.get(path.name))]

    def garbage(self, referenced: set[str]) -> list[tuple[Entry, int]]:
        """Entries whose key is not in ``referenced``, with their size in bytes."""
        return [(entry, sum(f["size"] for f in entry.files.values()))
                for entry in self.entries() if entry.key not in referenced]

    def remove(self, key: str) -> None:
        _remove_tree(self.path(key))
        self.statcache.forget(self.path(key))

    def link_visible(self, entry: Entry, visible: Path, unlinkable: tuple[str, ...] = ()) -> str:
        """Make ``visible`` show exactly the entry's files; returns how ("reflink", "hardlink", "copy").

        Files matching an ``unlinkable`` glob are reflinked or copied, never hardlinked (a reader may
        refuse a file with several links). The new tree is assembled beside the old one and swapped in
        by rename; the digests of copies are recorded, so checking them later reads nothing.
        """
        visible.parent.mkdir(parents=True, exist_ok=True)
        methods = {}
        with removed_on_failure(new_dir(visible.parent, f".{visible.name}.")) as staging:
            for name in sorted(entry.files):
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                hardlink = not any(fnmatch.fnmatch(name, pattern) for pattern in unlinkable)
                methods[name] = link_file(entry.artifact / name, target, hardlink)
            swap_in(staging, visible)
        for name, method in methods.items():
            if method != "hardlink":
                want = entry.files[name]
                self.statcache.record(visible / name, FileDigest(**want))
        used = set(methods.values())
        return "copy" if "copy" in used else "hardlink" if "hardlink" in used else "reflink"

    def visible_matches(self, entry: Entry, visible: Path) -> bool:
        """True when every entry file is present under ``visible`` with the same content.

        A hardlink is recognised by its inode without reading; a reflink or copy by the stat cache.
        """
        for name, want in entry.files.items():
            shown, stored = visible / name, entry.artifact / name
            try:
                a, b = shown.stat(), stored.stat()
            except FileNotFoundError:
                return False
            if (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev):
                continue
            if self.statcache.digest(shown).xxh3_128 != want["xxh3_128"]:
                return False
        return True


def new_dir(parent: Path, prefix: str) -> Path:
    """A new directory with a unique name, made like any other under the umask (``mkdtemp`` makes them
    0700: nobody else could read a build or a release)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def removed_on_failure(directory: Path) -> Iterator[Path]:
    """``directory`` for a tree being assembled: removed if anything fails before it is moved into place."""
    try:
        yield directory
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def swap_in(staging: Path, directory: Path) -> None:
    """Put the tree ``staging`` at ``directory`` by rename, moving an old tree out of the way first: a reader
    sees the old tree, the new one or, for the instant between the two renames, none; never a mix. A crash
    leaves at worst a dot-directory beside it."""
    if directory.exists():
        old = new_dir(directory.parent, f".{directory.name}.old.")
        os.rename(directory, old / "tree")
        os.rename(staging, directory)
        _remove_tree(old)
    else:
        os.rename(staging, directory)


def link_file(source: Path, target: Path, hardlink: bool = True) -> str:
    """Show ``source`` at ``target`` by reflink, else hardlink (if allowed), else a read-only copy; says which."""
    try:
        with open(source, "rb") as src, open(target, "wb") as dst:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        return "reflink"
    except OSError:
        target.unlink(missing_ok=True)
    if hardlink:
        try:
            os.link(source, target)
            return "hardlink"
        except OSError:
            pass
    shutil.copy2(source, target)
    target.chmod(0o444)
    return "copy"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(path: Path) -> None:
    """Remove a tree; store files are read-only but their directories are not, so unlink works."""
    if path.exists():
        shutil.rmtree(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
