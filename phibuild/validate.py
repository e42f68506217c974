"""Checks for everything phibuild reads from outside: settings, lock files, manifests, slice locks.

A record declares its fields once, as a table of ``{field: Field(check, required)}`` (as pydoit's
``valid_attr`` does for task dictionaries), and ``fields()`` applies it: unknown fields, missing ones and
values of the wrong type or shape are refused with the place they were found. A check returns the value it
accepts, so that what passed is exactly what is used. Paths are only ever built from names that passed
``name``, ``key`` or ``relative_path``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

Check = Callable[[Any, str], Any]  # (value, where it was found) -> the accepted value, or raises Invalid

NAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}\Z")
DISTRIBUTION = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,198}[A-Za-z0-9])?\Z")  # PEP 508
HEX = {n: re.compile(rf"[0-9a-f]{{{n}}}\Z") for n in (2, 16, 32, 40, 64)}
MAX_TEXT = 2000  # a smoke result or an origin; anything longer is not one
MAX_LIST = 64  # a per-position curve; anything longer is not one
WEEK = 7 * 24 * 3600


class Invalid(ValueError):
    """A value that failed its check; the message says where and why."""


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = True


def fields(data: Any, table: Mapping[str, Field], where: str) -> dict[str, Any]:
    """``data`` checked against ``table``: a dict with exactly the known fields, each accepted by its check."""
    if not isinstance(data, dict):
        raise Invalid(f"{where} must be a table, not {_kind(data)}")
    unknown = sorted(set(data) - set(table))
    if unknown:
        raise Invalid(f"{where} has unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                      f"known: {', '.join(sorted(table))}")
    missing = sorted(name for name, spec in table.items() if spec.required and name not in data)
    if missing:
        raise Invalid(f"{where} lacks {', '.join(missing)}")
    return {name: table[name].check(value, f"{where}.{name}") for name, value in data.items()}


def text(value: Any, where: str) -> str:
    """A single line of printable text, of reasonable length."""
    if not isinstance(value, str):
        raise Invalid(f"{where} must be a string, not {_kind(value)}")
    if len(value) > MAX_TEXT or not value.isprintable():
        raise Invalid(f"{where} must be one line of printable text of at most {MAX_TEXT} characters")
    return value


def pattern(regex: re.Pattern, value: Any, where: str) -> str:
    """A string the whole of which ``regex`` matches."""
    if not isinstance(value, str) or not regex.match(value):
        raise Invalid(f"{where}: {_short(value)} is not of the form {regex.pattern.removesuffix(chr(92) + 'Z')}")
    return value


def license_id(value: Any, where: str) -> str:
    """A license as model cards name it: an SPDX-like identifier (``mit``, ``apache-2.0``, ``llama3.1``)."""
    return pattern(LICENSE, value, where)


def clean_license(value: Any) -> str | None:
    """What a model card's ``license`` says, if it is an identifier phibuild can pass on; None otherwise (free
    text, escape codes and tabs from a README never reach the lock or a card)."""
    if isinstance(value, str) and LICENSE.match(value.strip().strip("'\"").lower()):
        return value.strip().strip("'\"").lower()
    return None


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"{where} must be true or false, not {_kind(value)}")
    return value


def count(value: Any, where: str) -> int:
    """A whole number, zero or more (sizes, token counts)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Invalid(f"{where} must be a whole number of zero or more, not {value!r}")
    return value


def seconds(value: Any, where: str) -> float:
    """A positive number of seconds, a week at most (a longer wait is a mistake, and overflows a timer)."""
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0
            or value > WEEK):
        raise Invalid(f"{where} must be a positive number of seconds, at most {WEEK} (a week), not {value!r}")
    return float(value)


def number(value: Any, where: str) -> float:
    """A finite number, zero or more (a measured figure)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise Invalid(f"{where} must be a finite number of zero or more, not {value!r}")
    return float(value)


def share(value: Any, where: str) -> float:
    """A share of something, from 0 to 1 (an agreement rate)."""
    if number(value, where) > 1:
        raise Invalid(f"{where} must be a share from 0 to 1, not {value!r}")
    return float(value)


def positive(value: Any, where: str) -> float:
    """A finite number above zero (a speed)."""
    if number(value, where) <= 0:
        raise Invalid(f"{where} must be a finite number above zero, not {value!r}")
    return float(value)


def perplexity(value: Any, where: str) -> float:
    """A perplexity: a finite number of at least 1 (the exponential of a mean negative log-probability)."""
    if number(value, where) < 1:
        raise Invalid(f"{where} must be a perplexity, a finite number of at least 1, not {value!r}")
    return float(value)


def number_list(value: Any, where: str) -> tuple[float, ...]:
    """A short list of measured figures (a per-position curve)."""
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise Invalid(f"{where} must be a list of at most {MAX_LIST} numbers, not {_short(value)}")
    return tuple(number(item, f"{where}[{index}]") for index, item in enumerate(value))


def hexdigest(length: int) -> Check:
    pattern = HEX[length]

    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or not pattern.match(value):
            raise Invalid(f"{where} must be {length} lowercase hex digits, not {_short(value)}")
        return value

    return check


key = hexdigest(32)  # cache keys, xxh3-128 digests
sha256 = hexdigest(64)
commit = hexdigest(40)


def name(value: Any, where: str) -> str:
    """A model, target, backend or precision name: safe as one path component and as a doit task name."""
    if not isinstance(value, str) or not NAME.match(value):
        raise Invalid(f"{where} must be a name of lowercase letters, digits, '.', '_' and '-' starting with a "
                      f"letter or digit, not {_short(value)}")
    return value


def relative_path(value: Any, where: str) -> str:
    """A file inside a directory, as manifests and locks name them: relative, POSIX, no '..', no tricks."""
    if not isinstance(value, str) or not value or "\\" in value or not value.isprintable():
        raise Invalid(f"{where}: {_short(value)} is not a file name")
    path = PurePosixPath(value)
    if path.is_absolute() or any(part in ("", ".", "..") for part in value.split("/")):
        raise Invalid(f"{where}: {value!r} is not a plain relative path inside the artifact")
    return value


def inside(directory: Path, relative: str) -> Path:
    """``directory / relative`` for a name that passed ``relative_path``, refused if it would leave
    ``directory`` through a symlink on disk."""
    path = directory / relative
    if not path.resolve().is_relative_to(directory.resolve()):
        raise Invalid(f"{relative!r} resolves outside {directory}")
    return path


def text_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Invalid(f"{where} must be a list of strings, like [\"a\", \"b\"], not {_short(value)}")
    return list(value)


def name_list(value: Any, where: str) -> list[str]:
    """Names, each once: a list of names is a set in order, and a name given twice is a slip."""
    return unique([name(item, f"{where}[{i}]") for i, item in enumerate(text_list(value, where))], where)


def unique(names: list[str], where: str) -> list[str]:
    """``names`` if none is given twice (a slip: a list of names is a set in order)."""
    twice = sorted({item for item in names if names.count(item) > 1})
    if twice:
        raise Invalid(f"{where} names {', '.join(twice)} more than once")
    return names


def distribution(value: Any, where: str) -> str:
    """A Python distribution's name as PEP 503 spells it (what a lock's toolchain lists, what pip installs)."""
    from packaging.utils import canonicalize_name

    if not isinstance(value, str) or not DISTRIBUTION.match(value):
        raise Invalid(f"{where}: {_short(value)} is not a Python distribution name")
    if canonicalize_name(value) != value:
        raise Invalid(f"{where}: {value!r} is not spelled as PEP 503 does ({canonicalize_name(value)!r})")
    return value


def version(value: Any, where: str) -> str:
    """An exact version as PEP 440 writes it (``2.14.1``, ``0.3.36``, ``2026.4.0.dev1``, ``2.14.1+cpu``)."""
    if not isinstance(value, str) or len(value) > 100:
        raise Invalid(f"{where} must be a version string, not {_short(value)}")
    if not _pep440().match(value):
        raise Invalid(f"{where}: {value!r} is not a PEP 440 version")
    return value


@functools.cache
def _pep440() -> re.Pattern:
    """packaging's own PEP 440 pattern, compiled once (a lock lists hundreds of versions)."""
    from packaging.version import VERSION_PATTERN

    return re.compile(rf"{VERSION_PATTERN}\Z", re.VERBOSE | re.IGNORECASE)


def table_of(check_key: Check, check_value: Check) -> Check:
    """A table whose keys and values each pass a check."""

    def check(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise Invalid(f"{where} must be a table, not {_kind(value)}")
        return {check_key(k, f"{where}"): check_value(v, f"{where}.{k}") for k, v in value.items()}

    return check


def tables(value: Any, where: str) -> dict[str, dict]:
    """A table of tables (``[artifacts.NAME]``, ``[toolchains.ID]``), each checked by its record."""
    if not isinstance(value, dict) or not all(isinstance(table, dict) for table in value.values()):
        raise Invalid(f"{where} must hold one table per entry")
    return value


def scalar(value: Any, where: str) -> str | int | float | bool:
    """A parameter value: a string, a number or true/false (never a table or a list)."""
    if isinstance(value, bool | int | str) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise Invalid(f"{where} must be a string, number or true/false, not {_kind(value)}")


def json_value(value: Any, where: str) -> Any:
    """Plain JSON data (key components in a manifest): tables, lists, strings, numbers, booleans."""
    if isinstance(value, dict):
        return {text(k, where): json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None:
        return None
    return scalar(value, where)


def _kind(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
