"""Reading what comes from outside, bounded by construction: a regular file, at most so many bytes, parsed into
data at most so deep.

Every file phibuild reads from outside (settings, locks, slice locks, manifests, model configs, safetensors
headers, model cards, release sums) goes through ``read_bytes`` with a limit fitted to its kind: a FIFO, a
device such as ``/dev/zero``, a directory or a symlink to one of them is refused before a byte is read, and so is
a file larger than its kind can be. ``json_data`` and ``toml_data`` parse with the nesting limited, so a document
nested thousands deep is one line of damage, never a RecursionError. Failures are ``Unreadable``, whose message is
one line naming the file; callers raise it again as their own kind of error (a lock's, a source's, damage).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from .errors import PhibuildError, file_system_error

KiB, MiB = 1024, 1024 * 1024
# What each kind of file may weigh. Generous against what phibuild writes (a lock of 56 artifacts is 170 KiB, a
# manifest a few KiB, Phi-4's index.json 40 KiB, safetensors' own header limit 100 MB) and small enough that
# reading one never exhausts a machine.
LIMITS = {
    "lock": 64 * MiB,
    "settings": 4 * MiB,
    "manifest": 16 * MiB,
    "model config": 64 * MiB,  # config.json, the weight index, tokenizer and processor configs
    "safetensors header": 100 * 1000 * 1000,
    "model card": 4 * MiB,
    "evaluation text": 64 * MiB,
    "release sums": 16 * MiB,
    "measurement": 4 * MiB,
    "key": 64 * KiB,
    "toolchain lock": 4 * MiB,
    "worker result": 64 * MiB,
    "pip configuration": 1 * MiB,
}
CHUNK = 1024 * 1024
MAX_DEPTH = 32  # phibuild's records nest 5 deep, a model's config.json about 4
KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}


class Unreadable(PhibuildError):
    """A file that is not a regular file, is larger than its kind may be, or does not parse; one line."""


def open_regular(path: Path | str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (a symlink to one is followed). Opened
    without blocking, so that a FIFO cannot hang the open; raises OSError (EINVAL) naming what it is instead."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file but {KINDS.get(stat.S_IFMT(mode), 'a special file')}",
                          str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: Path | str, kind: str) -> bytes:
    """The content of ``path``, a regular file of at most ``LIMITS[kind]`` bytes, else ``Unreadable``. An absent
    file raises FileNotFoundError, which callers take as "none"."""
    limit = LIMITS[kind]
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Unreadable(f"the {kind} {path} cannot be read: {file_system_error(exc)}") from None
    with os.fdopen(fd, "rb") as handle:
        if os.fstat(fd).st_size > limit:
            raise Unreadable(f"the {kind} {path} is larger than a {kind} can be ({_size(limit)}); it is not one")
        data = read_at_most(handle, limit + 1)
    if len(data) > limit:
        raise Unreadable(f"the {kind} {path} is larger than a {kind} can be ({_size(limit)}); it is not one")
    return data


def read_at_most(handle: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes of an open file or stream, read a chunk at a time (``read(limit)`` would allocate the
    whole limit at once, whatever the file holds)."""
    chunks, size = [], 0
    while size < limit:
        chunk = handle.read(min(CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_text(path: Path | str, kind: str) -> str:
    try:
        return read_bytes(path, kind).decode()
    except UnicodeDecodeError as exc:
        raise Unreadable(f"the {kind} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def json_data(data: bytes | str, what: str, unique: bool = True) -> Any:
    """Parsed JSON, nested at most ``MAX_DEPTH`` deep; with ``unique``, a key given twice in one object is refused
    (the last would silently win)."""
    try:
        value = json.loads(data, object_pairs_hook=_unique if unique else None)
    except RecursionError:
        raise Unreadable(f"{what} is nested too deeply to be what it claims") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unreadable(f"{what} is not valid JSON ({exc})") from None
    return _shallow(value, what)


def toml_data(text: str, what: str) -> dict[str, Any]:
    """Parsed TOML, nested at most ``MAX_DEPTH`` deep."""
    try:
        value = tomllib.loads(text)
    except RecursionError:
        raise Unreadable(f"{what} is nested too deeply to be what it claims") from None
    except ValueError as exc:  # TOMLDecodeError, and an integer of more digits than Python converts
        raise Unreadable(f"{what} is not valid TOML ({str(exc)[:200]})") from None
    return _shallow(value, what)


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, value in pairs:
        if name in found:
            raise ValueError(f"the key {name[:60]!r} is given twice")
        found[name] = value
    return found


def _shallow(value: Any, what: str) -> Any:
    """``value`` if no list or table in it is nested deeper than ``MAX_DEPTH`` (walked without recursion)."""
    level, depth = [value] if isinstance(value, dict | list) else [], 0
    while level:  # one level of containers at a time: scalars are never looked at twice
        if depth >= MAX_DEPTH:
            raise Unreadable(f"{what} is nested more than {MAX_DEPTH} deep, deeper than any such file is")
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, dict | list)]
        depth += 1
    return value


def _size(limit: int) -> str:
    return f"{limit / MiB:g} MiB" if limit >= MiB else f"{limit / KiB:g} KiB"
