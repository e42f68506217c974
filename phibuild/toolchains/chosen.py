"""The toolchains a project runs with: phibuild's own, each made from its lock (``Managed``), or an environment of
the user's own that the settings name (``Own``: a conda environment, a Docker image's interpreter), as
pre-commit's ``language: system`` is. Both answer the same few questions: what the key records, whether it can
run here, its facts, and a job run in it."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import validate as v
from ..errors import BuildError, ConfigError
from ..records import PYTHON, Toolchain
from . import facts, worker
from .declare import Locked, locked, python_tag


class Managed:
    """A toolchain of phibuild's: its environment is made from its lock on first use."""

    def __init__(self, name: str):
        self.name = name

    @functools.cached_property
    def locked(self) -> Locked:
        return locked(self.name)

    def unavailable(self) -> str | None:
        """Why it cannot run here (no lock for this interpreter and platform), or None."""
        try:
            locked(self.name)
        except ConfigError as exc:
            return str(exc)
        return None

    def record(self, backend: str) -> Toolchain:
        """What the key of ``backend``'s artifacts records of it: the lock's digest and packages."""
        return Toolchain(backend, python_tag(), self.locked.packages, self.locked.digest)

    def facts(self, backend: str) -> dict[str, str]:
        return facts.facts(self.locked, backend)

    def run(self, steps: list[dict[str, Any]], failure: str) -> list[Any]:
        return worker.run(self.locked, steps, failure)


class Own:
    """An environment of the user's own: its key is what it holds, asked of its interpreter once per run."""

    def __init__(self, name: str, interpreter: Path):
        self.name, self.interpreter = name, interpreter

    def unavailable(self) -> str | None:
        if not self.interpreter.is_file():
            return f"[tool.phibuild.toolchains] {self.name} = {str(self.interpreter)!r} is not an interpreter"
        return None

    @functools.cached_property
    def inventory(self) -> dict[str, Any]:
        return inventory(self.run, f"the {self.name} environment {self.interpreter}")

    def record(self, backend: str) -> Toolchain:
        inventory = self.inventory
        digest = hashlib.sha256(json.dumps(inventory, sort_keys=True).encode()).hexdigest()
        return Toolchain(backend, inventory["python"], inventory["packages"], digest)

    @functools.cache  # noqa: B019 (one per toolchain of a run)
    def facts(self, backend: str) -> dict[str, str]:
        return facts.asked(self.run, backend)

    def run(self, steps: list[dict[str, Any]], failure: str) -> list[Any]:
        return worker.call(self.interpreter, steps, failure)


def inventory(run: Callable[[list[dict[str, Any]], str], list[Any]], where: str) -> dict[str, Any]:
    """The interpreter's version and every distribution installed in an environment (``run``: a worker of it, as
    ``worker.call`` takes steps and failure), checked as a lock's packages are."""
    found = run([{"verb": "inventory", "failure": f"reading {where}"}], f"reading {where}")[0]
    try:
        fields = {"python": v.Field(lambda value, at: v.pattern(PYTHON, value, at)),
                  "packages": v.Field(v.table_of(v.distribution, v.version))}
        return v.fields(found, fields, where)
    except v.Invalid as exc:
        raise BuildError(str(exc)) from None


def chosen(name: str, own: dict[str, Path]) -> Managed | Own:
    """Toolchain ``name`` as the settings choose it (``own``: ``[tool.phibuild.toolchains]``)."""
    return Own(name, own[name]) if name in own else Managed(name)
