"""The errors phibuild reports to users: each says what is wrong and what to do, never a bare traceback."""

from __future__ import annotations

import errno
from collections.abc import Iterator


class PhibuildError(Exception):
    """Base class: the message is meant for the person running doit."""


class ConfigError(PhibuildError):
    """Bad ``[tool.phibuild]`` settings, unknown model, precision or backend, bad parameter."""


class UnsupportedError(PhibuildError):
    """A backend cannot build this architecture, precision or execution provider."""


class SourceError(PhibuildError):
    """Model weights missing, truncated or unreadable, or the hub unreachable."""


class LockError(PhibuildError):
    """``artifacts.lock`` is unreadable (broken TOML, merge conflict, invalid entry), disagrees with what was
    built under the same key, or would change in frozen mode."""


class BuildError(PhibuildError):
    """A backend failed, or its output failed verification."""


class DamageError(PhibuildError):
    """A store or remote entry whose manifest or files are not what they should be."""


class FileSystemError(PhibuildError):
    """An operating system error (permissions, a full disk, a symlink loop...), said in one line."""


# What to do about an OSError, by errno; any other errno gets the system's own words alone.
FIXES = {
    errno.EACCES: "check its owner and permissions, or point phibuild somewhere you may write",
    errno.EPERM: "check its owner and permissions, or point phibuild somewhere you may write",
    errno.ENOSPC: "free space on that file system (`doit gc --delete` removes store entries no lock uses)",
    errno.EDQUOT: "your disk quota is used up: free space, or ask for a larger quota",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
    errno.EROFS: "it is on a read-only file system: set store, build, lock or release_dir to a writable place",
    errno.ELOOP: "it is a symlink loop: fix or remove the link",
    errno.ENOENT: "it does not exist (or is a symlink to nothing)",
    errno.EISDIR: "it is a directory where a file is expected: remove or rename it",
    errno.ENOTDIR: "part of the path is a file where a directory is expected",
    errno.ENAMETOOLONG: "the path is too long for the file system",
}


def file_system_error(exc: OSError, doing: str = "") -> FileSystemError:
    """One line for any OSError: what phibuild was doing, the file, what the system said, and the fix."""
    where = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
    said = exc.strerror or str(exc) or type(exc).__name__
    message = f"{doing + ': ' if doing else ''}{where + ': ' if where else ''}{said}"
    fix = FIXES.get(exc.errno) if exc.errno is not None else None
    return FileSystemError(f"{message}; {fix}" if fix else message)


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what caused it, in order (each once, even in a cycle)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
