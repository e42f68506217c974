"""The content-addressed store: each finished artifact lives under its cache key, read-only.

Layout under the store root (default ``.phibuild/``)::

    objects/ab/abcdef.../artifact/...   the backend's output files (mode 0444)
    objects/ab/abcdef.../manifest.json  their sizes and digests, the key components and the smoke check
    tmp/<pid>-<random>/                 builds in progress; a killed build leaves only this behind
    locks/<key>.lock                    held while a key is being built, so two processes build it once
    locks/lockfile-<digest>.lock        held while artifacts.lock is rewritten
    statcache.sqlite                    see hashing.StatCache

An entry is built in ``tmp/``, verified, then published with one ``rename``: it is either complete or
absent. Nothing in it is trusted when it is taken out again: ``find`` reads every file and compares it with
what the lock pins (or, for a key the lock does not pin, with the entry's own manifest), and an entry that
differs is damage, removed and rebuilt. Users see artifacts under a stable path (``build/<target>/``), whose
files are reflinks or hardlinks of the store's, copied only where neither works.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import reading, validate
from .errors import BuildError, ConfigError, DamageError, LockError
from .hashing import FileDigest, StatCache, digest_json, hash_file
from .linking import link_file
from .processes import alive
from .records import Manifest, differing_files

log = logging.getLogger(__name__)

STAGING = ".phibuild-"  # in the names of half-made trees and files beside their final place
STAGED = re.compile(r"\..+\.phibuild-([0-9]+)-[0-9a-f]{8}\Z")  # staging_name's, exactly: nothing else is swept
BUILDING = re.compile(r"([0-9]+)-[0-9a-f]{8}\Z")  # Store.building's directories in tmp/
STORE_MARK = ".phibuild-store"  # in a store's root: the directory is phibuild's to write and remove in
# What a store made by an older phibuild holds, and nothing else: such a directory is taken as a store.
STORE_NAMES = {"objects", "tmp", "locks", "projects", "toolchains.json", "statcache.sqlite", "statcache.sqlite-wal",
               "statcache.sqlite-shm", "statcache.sqlite-journal", "matplotlib", STORE_MARK}


class PinMismatch(LockError):
    """The lock pins other files for a key than the store's entry holds, and that entry matches its own manifest:
    either the lock was edited or the entry was forged, which only building it again can tell (``build.obtain``).
    The entry is kept."""

    def __init__(self, message: str, entry: Entry):
        super().__init__(message)
        self.entry = entry


@dataclass(frozen=True)
class Entry:
    """A published store entry whose files were checked against what was expected of them."""

    directory: Path
    manifest: Manifest

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def artifact(self) -> Path:
        return self.directory / "artifact"

    @property
    def files(self) -> dict[str, FileDigest]:
        return self.manifest.files


class Store:
    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        _claim(root)
        self.statcache = StatCache(root / "statcache.sqlite")
        _mark(root)

    def register(self, lock: Path) -> None:
        """Remember that the project whose lock is ``lock`` uses this store, so that ``doit gc`` in any project
        sharing it keeps what every one of them references (best effort: a read-only store is only read)."""
        record = self.root / "projects" / f"{digest_json(str(lock))[:16]}.txt"
        if not record.exists():
            with contextlib.suppress(OSError):
                record.parent.mkdir(exist_ok=True)
                write_file(record, str(lock) + "\n")

    def users(self) -> list[Path]:
        """The locks of the projects that use this store (``register``). A record whose lock is gone is dropped: it
        references nothing, and its project registers again when it next runs. A record that cannot be read is
        DamageError: then nobody can tell what is garbage."""
        found = []
        for record in sorted((self.root / "projects").glob("*.txt")):
            try:
                lock = Path(reading.read_text(record, "key").strip())
            except (OSError, reading.Unreadable) as exc:
                raise DamageError(f"{record} cannot be read ({exc})") from None
            if lock.exists():
                found.append(lock)
            else:
                record.unlink(missing_ok=True)
        return found

    def path(self, key: str) -> Path:
        key = validate.key(key, "a cache key")
        return self.objects / key[:2] / key

    # -- reading -----------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The entry under ``key`` as its manifest describes it, None if there is none; DamageError if the
        manifest is unreadable or describes another key. Its files are not checked (see ``find``)."""
        directory = self.path(key)
        manifest_path = directory / "manifest.json"
        try:
            data = reading.json_data(reading.read_bytes(manifest_path, "manifest"), str(manifest_path))
        except FileNotFoundError:
            return None
        except reading.Unreadable as exc:
            raise DamageError(str(exc)) from None
        try:
            manifest = Manifest.from_dict(data, str(manifest_path))
        except validate.Invalid as exc:
            raise DamageError(str(exc)) from None
        if manifest.key != key:
            raise DamageError(f"{manifest_path} describes key {manifest.key}, not {key}")
        return Entry(directory, manifest)

    def find(self, key: str, expected: dict[str, FileDigest] | None) -> Entry | None:
        """The entry under ``key`` if its manifest lists exactly the files ``expected`` (the lock's pin, when the
        lock pins this key) and every file has the content its manifest records. Every byte is read: a store
        file can rot without its size or time changing. A damaged entry is reported and removed, and None
        returned. An intact entry whose files are not the ones the lock pins is not damage but a lock that was
        edited (or comes from a build that differs): PinMismatch, and the entry is kept."""
        try:
            entry = self.get(key)
            if entry is None:
                return None
            damaged = self.damaged_files(entry, read=True)
            if damaged:
                raise DamageError(f"files differ from its manifest: {', '.join(damaged)}")
            if expected is not None and entry.files != expected:
                raise PinMismatch(f"artifacts.lock pins other files for key {key} than the store holds "
                                  f"({described(entry.files, expected)})", entry)
        except DamageError as exc:
            log.warning("store entry %s is damaged (%s); building it again", key, exc)
            self.remove(key)
            return None
        return entry

    def damaged_files(self, entry: Entry, expected: dict[str, FileDigest] | None = None,
                      read: bool = False) -> list[str]:
        """Files of ``entry`` that are missing or whose size or xxh3 differ from ``expected`` (default: its
        own manifest), and files it has that are not expected. Unchanged files are judged by the stat cache
        unless ``read``."""
        want = expected if expected is not None else entry.files
        damaged = sorted(set(entry.files) ^ set(want))
        for name, digest in sorted(want.items()):
            if name not in entry.files:
                continue
            path = entry.artifact / name
            try:
                got = hash_file(path) if read else self.statcache.digest(path)
            except FileNotFoundError:
                damaged.append(name)
                continue
            if not got.same_content(digest):
                damaged.append(name)
        return sorted(set(damaged))

    def entries(self) -> tuple[list[Entry], list[Path], list[Path]]:
        """Every published entry, by key; the entry directories whose manifest is damaged; and what lies in
        ``objects/`` that is not an entry's place (a symlink, a file, a stranger's name): never phibuild's to
        remove."""
        found, damaged, strays = [], [], []
        if not self.objects.is_dir():
            return found, damaged, strays
        for fan in sorted(self.objects.iterdir()):
            if not _real_dir(fan) or not validate.HEX[2].match(fan.name):
                strays.append(fan)
                continue
            for path in sorted(fan.iterdir()):
                if not _real_dir(path) or not validate.HEX[32].match(path.name) or path.name[:2] != fan.name:
                    strays.append(path)
                    continue
                try:
                    entry = self.get(path.name)
                except DamageError:
                    damaged.append(path)
                    continue
                if entry is not None:
                    found.append(entry)
                else:
                    damaged.append(path)  # an entry's place without a manifest: a publish that never happened
        return found, damaged, strays

    # -- writing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """An inter-process lock for building ``key``: the second builder waits, then finds it published.
        A store this user cannot write is only read from, so it needs no lock."""
        from filelock import FileLock  # here: a no-op run locks nothing

        try:
            self.locks.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.locks / f"{validate.key(key, 'a cache key')}.lock"))
            lock.acquire()
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            yield
            return
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def building(self) -> Iterator[Path]:
        """A fresh directory in ``tmp/`` for one build, removed if anything fails before it is published;
        left-overs of dead builds are removed first."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._remove_dead_builds()
        with removed_on_failure(new_dir(self.tmp, f"{os.getpid()}-")) as directory:
            yield directory

    def _remove_dead_builds(self) -> None:
        if not self.below(self.tmp):
            raise DamageError(f"{self.tmp} lies behind a symlink; phibuild removes nothing outside its store")
        for stale in self.tmp.iterdir():
            building = BUILDING.match(stale.name)
            if building and not alive(int(building.group(1))) and _real_dir(stale):
                shutil.rmtree(stale, ignore_errors=True)  # another process may be removing it too

    def publish(self, build_dir: Path, manifest: Manifest) -> Entry:
        """Seal ``build_dir`` (holding ``artifact/``) and move it to its key in one rename.

        If another process published the same key first, its entry wins and ours is discarded: both were
        checked against the same expectation. The manifest's digests are those of files the caller has just
        hashed: they are recorded, so that later stat checks need not read the files again.
        """
        data = manifest.to_dict()
        try:  # written only as it will be read back
            Manifest.from_dict(data, f"the manifest of {manifest.label}")
        except validate.Invalid as exc:
            raise BuildError(f"{manifest.label}: its manifest would not be readable, so it is not stored: {exc}") \
                from None
        (build_dir / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for path in sorted(build_dir.rglob("*")):
            if path.is_file():
                _fsync(path)
                path.chmod(0o444)
        final = self.path(manifest.key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if not self.below(final.parent):
            raise DamageError(f"{final.parent} lies behind a symlink; phibuild writes nothing outside its store")
        try:
            os.rename(build_dir, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            _remove_tree(build_dir)
            return Entry(final, manifest)
        _fsync_dir(final.parent)
        entry = Entry(final, manifest)
        for name, digest in entry.files.items():
            self.statcache.record(entry.artifact / name, digest)
        return entry

    def remove(self, key: str) -> None:
        self.remove_tree(self.path(key))

    def remove_tree(self, path: Path) -> None:
        """Remove an entry's directory (or a dead build's), proven to lie in this store: no symlink between the
        store's root and it. Anything else is refused, never followed."""
        if not (path.exists() or path.is_symlink()):
            return
        if not self.below(path) or not _real_dir(path):
            raise DamageError(f"{path} is not a directory of the store (it lies behind a symlink or is one); "
                              "phibuild removes nothing it did not make: look at it and remove it by hand")
        _remove_tree(path)
        self.statcache.forget(path)

    def below(self, path: Path) -> bool:
        """Whether ``path`` lies under the store's root with no symlink on the way: its real path is the
        store's real root joined with its relative path."""
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            return False
        return os.path.realpath(path) == os.path.normpath(os.path.join(os.path.realpath(self.root), relative))

    # -- showing -----------------------------------------------------------------------------------

    def show(self, entry: Entry, visible: Path, unlinkable: tuple[str, ...] = (),
             shown_before: frozenset[str] = frozenset()) -> dict[str, str]:
        """Make ``visible`` show exactly the entry's files; returns how each was placed ("reflink",
        "hardlink", "copy").

        Files matching an ``unlinkable`` glob are reflinked or copied, never hardlinked (a reader may refuse
        a file with several links). The new tree is assembled beside the old one and swapped in by rename;
        the digests of copies are recorded, so checking them later reads nothing. An old tree without
        phibuild's mark is replaced only if it holds nothing but the entry's files or ``shown_before`` (the
        files of the entry the lock pinned before).
        """
        methods = {}
        known = set(entry.files) | shown_before
        with staged(visible, lambda old: files_under(old) - known) as staging:
            for name in sorted(entry.files):
                target = validate.inside(staging, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                hardlink = not any(fnmatch.fnmatch(name, pattern) for pattern in unlinkable)
                methods[name] = link_file(entry.artifact / name, target, hardlink)
        for name, method in methods.items():
            if method != "hardlink":
                self.statcache.record(visible / name, entry.files[name])
        return methods

    def visible_matches(self, entry: Entry, visible: Path) -> bool:
        """True when exactly the entry's files are under ``visible``, with the same content.

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
            if not self.statcache.digest(shown).same_content(want):
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


def staging_name(final: Path) -> Path:
    """A hidden name beside ``final`` for the half-made tree or file that will replace it: it carries this
    process's id, so that ``sweep`` can tell the leftovers of dead processes from work in progress."""
    return final.with_name(f".{final.name}{STAGING}{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def staged(final: Path, foreign: Callable[[Path], set[str]] = lambda path: files_under(path)) -> Iterator[Path]:
    """A staging directory beside ``final``, swapped in by rename when the block ends and removed if it
    fails. A reader sees the old tree, the new one or, for the instant between two renames, none; never a
    mix. A kill leaves a hidden staging directory that the next run's ``sweep`` removes.

    Only a directory phibuild made is replaced: one in which ``foreign`` finds nothing phibuild would not have put
    there (the files of the artifact it shows; a release's SHA256SUMS and the files it lists). Anything else (a file,
    a symlink, a directory holding a file, link or empty directory of someone else's) is refused before anything is
    written."""
    if final.exists() or final.is_symlink():
        _check_made(final, foreign)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final.parent)
    with removed_on_failure(staging_name(final)) as staging:
        staging.mkdir()
        yield staging
        if final.exists():
            old = staging_name(final)
            os.rename(final, old)
            os.rename(staging, final)
            _remove_tree(old)
        else:
            os.rename(staging, final)


def remove_made(directory: Path, foreign: Callable[[Path], set[str]] = lambda path: files_under(path)) -> None:
    """Remove a directory phibuild made (see ``staged``), and refuse anything else."""
    _check_made(directory, foreign)
    _remove_tree(directory)


def _check_made(final: Path, foreign: Callable[[Path], set[str]]) -> None:
    """Refuse to replace ``final`` unless phibuild made it (see ``staged``)."""
    if final.is_symlink() or not final.is_dir():
        kind = "a symlink" if final.is_symlink() else "a file"
        raise ConfigError(f"{final} is {kind}, not a directory phibuild made; it replaces only its own "
                          "directories: choose another place for it in [tool.phibuild]")
    names = sorted(foreign(final))
    if not names:
        return
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise ConfigError(f"{final} was not made by phibuild (it holds {shown}); phibuild replaces only directories it "
                      "made: move it away, or choose another place for it in [tool.phibuild]")


def files_under(directory: Path) -> set[str]:
    """Everything under ``directory`` that is not a directory with something in it, by relative path: files,
    symlinks (to directories too, never followed) and empty directories (as ``name/``). What ``staged`` compares
    with what phibuild would have put there."""
    found = set()
    for root, dirs, names in os.walk(directory):
        base = Path(root).relative_to(directory)
        for name in dirs:
            path = Path(root) / name
            if path.is_symlink():
                found.add((base / name).as_posix())
            elif not any(path.iterdir()):
                found.add((base / name).as_posix() + "/")
        found.update((base / name).as_posix() for name in names)
    return found


def _claim(root: Path) -> None:
    """Refuse a store setting that names a directory phibuild did not make: a store's tmp/ and objects/ are
    removed in, so only a new or empty directory, one with the store's mark, or one holding nothing but what a
    store holds is taken."""
    if root.is_symlink() and not root.exists():
        raise ConfigError(f"the store {root} is a symlink to nothing")
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"the store {root} is a file, not a directory: set store to a directory of its own")
    names = {name for name in os.listdir(root) if not STAGED.match(name)}
    if not names or STORE_MARK in names or (names <= STORE_NAMES and "statcache.sqlite" in names):
        return  # new, marked, or made by an older phibuild (every store has its stat cache from the start)
    shown = ", ".join(sorted(names - STORE_NAMES)[:4])
    raise ConfigError(f"the store {root} is a directory phibuild did not make (it holds {shown}); phibuild removes "
                      "entries and dead builds inside its store: set store to a new directory")


def _mark(root: Path) -> None:
    """Put the store's mark in its root (best effort: a read-only store is only read)."""
    with contextlib.suppress(OSError):
        if not (root / STORE_MARK).exists():
            (root / STORE_MARK).write_text("a phibuild store: phibuild writes and removes entries below this\n")


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def described(got: dict[str, FileDigest], pinned: dict[str, FileDigest]) -> str:
    """How a store entry's files differ from a pin, file by file: "model.onnx: 120 bytes, locked 121"."""
    said = []
    for name in differing_files(got, pinned):
        have, want = got.get(name), pinned.get(name)
        if have is None or want is None:
            said.append(f"{name}: {'only the lock' if have is None else 'only the store'} has it")
        elif have.size != want.size:
            said.append(f"{name}: {have.size} bytes, locked {want.size}")
        elif have.sha256 != want.sha256:
            said.append(f"{name}: sha256 {have.sha256[:12]}, locked {want.sha256[:12]}")
        else:
            said.append(f"{name}: xxh3_128 {have.xxh3_128[:12]}, locked {want.xxh3_128[:12]}")
    return "; ".join(said)


def write_file(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename, synced to disk, keeping the old file's mode (a new one
    gets the umask's, as any file). A crash leaves the old file, and at most a hidden staging file that the
    next write's ``sweep`` removes."""
    sweep(path.parent)
    tmp = staging_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as handle:
            if path.exists():
                os.fchmod(handle.fileno(), stat.S_IMODE(path.stat().st_mode))
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def removed_on_failure(directory: Path) -> Iterator[Path]:
    """``directory`` for a tree being assembled: removed if anything fails before it is moved into place."""
    try:
        yield directory
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def sweep(directory: Path) -> None:
    """Remove what dead phibuild processes left half-made in ``directory`` (see ``staging_name``)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        staged_by = STAGED.match(name)
        if staged_by is None:
            continue
        pid = staged_by.group(1)
        if not alive(int(pid)):
            path = directory / name
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()


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
