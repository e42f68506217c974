"""What software a build runs on, found by mechanism rather than kept by hand.

A backend's toolchain is the requirement closure of its pip extra (``phibuild[onnx]`` and everything that
pulls in, with extras and markers evaluated here), with the exact installed version of each distribution,
and the interpreter. All of it enters the backend's cache key. Walking the installed metadata costs a few
hundred milliseconds, so the result is kept in the store, valid while no directory on ``sys.path`` that holds
distributions changes (installing or removing one changes its site-packages directory).

A build sees only what its key covers: ``covered_only`` hides every other installed distribution while a
backend runs, the way ``sys.modules[name] = None`` hides a module, so an optional import (httpcore looking
for trio, tabulate for wcwidth) finds nothing, exactly as on a machine without it. The same key then means
the same software on every machine, whatever else is installed there. A build that truly needs a hidden
distribution fails, naming it; ``imports_outside`` checks afterwards that nothing slipped past (a namespace
package shared with a covered distribution).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BuildError, causes
from .records import Toolchain

log = logging.getLogger(__name__)

PROJECT = "phibuild"  # its own code is covered by the recipe version in every key, not by a package version
CACHE_FORMAT = 1


def python() -> str:
    """The interpreter, as keys record it: implementation and minor version."""
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"


class Environment:
    """The installed distributions, read once per environment (cached under ``cache``)."""

    def __init__(self, cache: Path | None = None):
        self.cache = cache
        # {"closures": {extra: ...}, "optional": {[extra, optional]: packages}, "probes": {name: ...}}
        self._known: dict[str, dict[str, Any]] | None = None

    def toolchain(self, backend: str, extra: str, optional: tuple[str, ...] = ()) -> Toolchain:
        """The toolchain of ``backend``: the closure of ``phibuild[extra]``, and of those of ``optional`` that
        are installed (what the toolchain imports when it finds it); raises LookupError naming what is not
        installed."""
        closure = self._closure(extra)
        if closure["missing"]:
            raise LookupError(", ".join(closure["missing"]))
        with_optional = self._table("optional")
        cached = json.dumps([extra, sorted(optional)])
        if cached not in with_optional:
            installed = _installed()
            found = _walk([(name, ()) for name in optional if name in installed], installed)[0]
            with_optional[cached] = dict(sorted({**closure["packages"], **found}.items()))
            self._save()
        return Toolchain(backend, python(), dict(with_optional[cached]))

    def probe(self, name: str, signature: list, compute) -> str:
        """``compute()``, a fact about the installed software that is costly to find out (a fingerprint),
        remembered with the store's toolchains while ``signature`` (say, a library's size and time) holds."""
        probes = self._table("probes")
        known = probes.get(name)
        if isinstance(known, dict) and known.get("signature") == signature:
            return known["value"]
        probes[name] = {"signature": signature, "value": compute()}
        self._save()
        return probes[name]["value"]

    def uninstalled(self, names: list[str]) -> list[str]:
        """Those of ``names`` (canonical distribution names) that are not installed."""
        installed = _installed()
        return [name for name in names if name not in installed]

    def missing(self, extra: str) -> list[str]:
        """The distributions ``phibuild[extra]`` requires directly that are not installed."""
        return list(self._closure(extra)["missing"])

    def _closure(self, extra: str) -> dict[str, Any]:
        closures = self._table("closures")
        if extra not in closures:
            installed = _installed()
            packages, missing = _walk(_extra_requirements(extra, installed), installed)
            closures[extra] = {"packages": packages, "missing": missing}
            self._save()
        return closures[extra]

    def _table(self, name: str) -> dict[str, Any]:
        if self._known is None:
            self._known = self._load()
        return self._known.setdefault(name, {})

    def _load(self) -> dict[str, dict[str, Any]]:
        """What an earlier run found in this same environment; anything unreadable is found out again."""
        if self.cache is None:
            return {}
        from . import reading

        try:
            data = reading.json_data(reading.read_bytes(self.cache, "manifest"), str(self.cache))
        except (OSError, reading.Unreadable):
            return {}
        if not isinstance(data, dict) or data.get("signature") != _signature():
            return {}
        return {name: data[name] for name in ("closures", "optional", "probes") if isinstance(data.get(name), dict)}

    def _save(self) -> None:
        """Best effort: a store this user cannot write computes the closures again next time."""
        if self.cache is None:
            return
        from .store import write_file

        with contextlib.suppress(OSError):
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            write_file(self.cache, json.dumps({"signature": _signature(), **self._known}, sort_keys=True))


def _signature() -> list:
    """What the installed set depends on: the interpreter and, by mtime, the directories on sys.path that hold
    distributions (site-packages; installing or removing one changes it). Others are left out: the project's
    own directory, which doit puts on sys.path, changes with every run's .doit.db."""
    dirs = []
    for entry in sys.path:
        with contextlib.suppress(OSError), os.scandir(entry or ".") as children:
            if any(child.name.endswith((".dist-info", ".egg-info")) for child in children):
                dirs.append([entry, os.stat(entry or ".").st_mtime_ns])
    return [CACHE_FORMAT, sys.executable, sys.version, dirs]


@functools.cache
def _installed() -> dict[str, importlib.metadata.Distribution]:
    """Every installed distribution by canonical name; the first on sys.path wins, as for imports."""
    from packaging.utils import canonicalize_name

    found: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist)
    return found


def _extra_requirements(extra: str, installed: dict) -> list[tuple[str, tuple[str, ...]]]:
    """phibuild's requirements that belong to ``extra`` (not its core ones), as (name, extras)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    own = installed.get(PROJECT)
    if own is None:
        raise LookupError(f"{PROJECT} itself (install it: pip install -e .)")
    roots = []
    for text in own.requires or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is not None and marker.evaluate({"extra": extra}) and not marker.evaluate({"extra": ""}):
            name = canonicalize_name(requirement.name)
            if name == PROJECT:  # an extra made of other extras, like all
                roots += [r for sub in requirement.extras for r in _extra_requirements(sub, installed)]
            else:
                roots.append((name, tuple(sorted(requirement.extras))))
    return roots


def _walk(roots: list[tuple[str, tuple[str, ...]]], installed: dict) -> tuple[dict[str, str], list[str]]:
    """The installed closure of ``roots``: {name: version}, and the roots that are not installed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    missing = sorted({name for name, _ in roots if name not in installed})
    versions: dict[str, str] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [root for root in roots if root[0] in installed]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or name == PROJECT:
            continue
        seen.add((name, extras))
        dist = installed.get(name)
        if dist is None:
            continue  # required under a marker this platform does not meet, or not installed: not imported
        versions[name] = dist.version
        environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                todo.append((canonicalize_name(requirement.name), tuple(sorted(requirement.extras))))
    return dict(sorted(versions.items())), missing


def loaded_distributions(modules: set[str] | None = None) -> dict[str, str]:
    """The distributions that provide ``modules`` (default: every module loaded now), with their versions;
    standard-library modules and modules no distribution installed (phibuild's, a test's) are left out."""
    from packaging.utils import canonicalize_name

    owners = _owners()
    found: dict[str, str] = {}
    for module in sorted(modules if modules is not None else set(sys.modules)):
        top = module.partition(".")[0]
        if top in sys.stdlib_module_names or top not in owners:
            continue
        candidates = owners[top]
        if len(candidates) > 1:  # a namespace package (google.*): the module's own file tells whose it is
            candidates = _owning(sys.modules.get(module), candidates) or candidates[:0]
        for name in candidates:
            canonical = canonicalize_name(name)
            if canonical != PROJECT and canonical in _installed():
                found[canonical] = _installed()[canonical].version
    return found


@contextlib.contextmanager
def covered_only(toolchain: Toolchain, label: str, extra: str) -> Iterator[None]:
    """Run the body with every installed distribution that ``toolchain`` (and phibuild's own requirements)
    do not cover hidden from imports; a body that needs one fails with a BuildError saying how to cover it."""
    from packaging.utils import canonicalize_name

    covered = set(toolchain.packages) | _core() | {PROJECT}
    hidden = {top: owners[0] for top, owners in _owners().items()
              if top not in sys.modules and top not in sys.stdlib_module_names and top.isidentifier()
              and not any(canonicalize_name(owner) in covered for owner in owners)}
    for top in hidden:
        sys.modules[top] = None  # type: ignore[assignment]
    try:
        yield
    except Exception as exc:
        needed = sorted({canonicalize_name(hidden[e.name.partition(".")[0]]) for e in causes(exc)
                         if isinstance(e, ModuleNotFoundError) and e.name and e.name.partition(".")[0] in hidden})
        if needed:
            raise not_covered(label, f"needs {', '.join(needed)}", needed, toolchain, extra,
                              "so phibuild hides it") from exc
        raise
    finally:
        for top in hidden:
            if top in sys.modules and sys.modules[top] is None:
                del sys.modules[top]


def not_covered(label: str, what: str, names: list[str], toolchain: Toolchain, extra: str, then: str) -> BuildError:
    """The one message for a build and distributions ``names`` its key does not cover: how to cover them."""
    return BuildError(f"{label}: the build {what}, which its cache key does not cover (nothing phibuild[{extra}] "
                      f"requires pulls it in), {then}. Add it to the key with [tool.phibuild.key_packages] "
                      f"{toolchain.backend} = [{', '.join(repr(name) for name in names)}]")


def imports_outside(before: set[str], toolchain: Toolchain) -> dict[str, str]:
    """Distributions whose modules were first imported after ``before`` (a snapshot of ``sys.modules``) and
    that ``toolchain`` does not cover, with their versions. phibuild's own requirements are phibuild's (its
    code is covered by the recipe version), not the toolchain's."""
    new = set(sys.modules) - before
    own = _core()
    return {name: version for name, version in loaded_distributions(new).items()
            if name not in toolchain.packages and name not in own}


@functools.cache
def _core() -> frozenset[str]:
    """phibuild's core requirements and what they pull in."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    installed = _installed()
    own = installed.get(PROJECT)
    requirements = [Requirement(text) for text in (own.requires or [])] if own else []
    roots = [(canonicalize_name(r.name), tuple(sorted(r.extras))) for r in requirements if r.marker is None]
    return frozenset(_walk(roots, installed)[0])


@functools.cache
def _owners() -> dict[str, list[str]]:
    return {top: sorted(set(names)) for top, names in importlib.metadata.packages_distributions().items()}


def _owning(module: object, candidates: list[str]) -> list[str]:
    path = getattr(module, "__file__", None)
    if not path:
        return []
    path = os.path.realpath(path)
    for name in candidates:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            dist = importlib.metadata.distribution(name)
            for file in dist.files or []:
                if os.path.realpath(dist.locate_file(file)) == path:
                    return [name]
    return []


def constraints(extras: tuple[str, ...], marker: str) -> list[str]:
    """``name==version ; marker`` for every distribution the closure of ``extras`` installs here."""
    installed = _installed()
    own = installed.get(PROJECT)
    known = set(own.metadata.get_all("Provides-Extra") or []) if own is not None else set()
    unknown = sorted(set(extras) - known)
    if unknown:
        raise ValueError(f"{', '.join(unknown)} is not an extra of phibuild; it has {', '.join(sorted(known))}")
    roots = [root for extra in extras for root in _extra_requirements(extra, installed)]
    versions, _ = _walk(roots, installed)
    return [f"{name}=={version} ; {marker}" for name, version in versions.items()]
