"""What a backend's ``facts`` found in its toolchain's environment (a llama.cpp build's quantizer fingerprint,
whether it has AMX kernels), found once per environment by its worker and kept in the environment's directory:
the environment does not change once made, so neither do they."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from typing import Any

from .. import reading, validate
from ..errors import BuildError
from . import environment, worker
from .declare import Locked

FORMAT = 1  # bump when a backend's facts change meaning
_known: dict[tuple[str, str, str], dict[str, str]] = {}


def facts(locked: Locked, backend: str) -> dict[str, str]:
    """``backend``'s facts about ``locked``'s environment (made now if it is not there yet)."""
    known = (locked.name, locked.digest, backend)
    if known not in _known:
        _known[known] = _kept(locked, backend)
    return _known[known]


def _kept(locked: Locked, backend: str) -> dict[str, str]:
    place = environment.ensure(locked)
    path = place / f"facts-{backend}.json"
    with contextlib.suppress(FileNotFoundError, OSError, reading.Unreadable, validate.Invalid):
        data = reading.json_data(reading.read_bytes(path, "measurement"), str(path))
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return validate.table_of(validate.name, validate.text)(data.get("facts"), str(path))
    found = asked(functools.partial(worker.call, environment.python(place)), backend)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(json.dumps({"format": FORMAT, "facts": found}))
    os.replace(scratch, path)
    return found


def asked(run: Callable[[list[dict[str, Any]], str], list[Any]], backend: str) -> dict[str, str]:
    """``backend``'s facts, asked of a worker (``run``: steps and failure, as ``worker.call`` takes them) and
    checked where they enter."""
    found = run([{"verb": "facts", "backend": backend, "failure": f"{backend}'s facts"}], f"{backend}'s facts")[0]
    try:
        return validate.table_of(validate.name, validate.text)(found, f"{backend}'s facts")
    except validate.Invalid as exc:
        raise BuildError(str(exc)) from None
