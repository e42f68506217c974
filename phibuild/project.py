"""A phibuild project: its settings, store, remote and lock, its targets, and each target's cache key.

The verbs live in modules of their own: ``status`` (is a target fresh), ``build`` (make it so),
``verify``, ``release``, ``assemble`` and ``gc``. This module only knows what there is and what it is called.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import backends, signing, sources
from .backends import Backend
from .catalog import VISION_ARCHITECTURES, ModelSpec
from .config import Config, load, switch
from .errors import PhibuildError, SourceError, UnsupportedError
from .hashing import digest_json
from .lockfile import Lockfile
from .records import KeyParts, Toolchain
from .remote import NoRemote, Remote
from .store import Store
from .toolchains import declare
from .toolchains.chosen import Managed, Own, chosen

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
RECIPE = 2  # bump when phibuild's own pipeline changes what any backend produces


@dataclass(frozen=True)
class Target:
    model: ModelSpec
    precision: str
    backend: Backend
    params: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.model.name}-{self.precision}-{self.backend.name}"


@dataclass(frozen=True)
class Plan:
    """A target's cache key and what it was computed from."""

    target: Target
    parts: KeyParts
    revision: str | None  # hub commit, when the model comes from the hub
    source: sources.Source | None  # None when a pinned hub source was not downloaded

    @property
    def key(self) -> str:
        return self.parts.key


@dataclass(frozen=True)
class LeftOut:
    """A model, precision and backend that make no target, and why in a few words."""

    model: str
    precision: str
    backend: str
    reason: str

    @property
    def name(self) -> str:
        return f"{self.model}-{self.precision}-{self.backend}"


def left_out_summary(left_out: list[LeftOut]) -> str:
    """One short line: each model with its reason per backend, the precisions named only when not all are."""
    grouped: dict[str, dict[tuple[str, str], list[str]]] = {}
    for item in left_out:
        grouped.setdefault(item.model, {}).setdefault((item.backend, item.reason), []).append(item.precision)
    parts = []
    for model, reasons in grouped.items():
        said = "; ".join(f"{backend}{' at ' + ', '.join(precisions) if len(precisions) < 4 else ''}: {reason}"
                         for (backend, reason), precisions in reasons.items())
        parts.append(f"{model} ({said})")
    return "; ".join(parts)


def frozen() -> bool:
    """``PHIBUILD_FROZEN=1``: fail instead of changing artifacts.lock (for CI)."""
    return switch("PHIBUILD_FROZEN")


def restore_only() -> bool:
    """``PHIBUILD_RESTORE_ONLY=1``: take artifacts from the store or the remote, never build (CI fan-in)."""
    return switch("PHIBUILD_RESTORE_ONLY")


def repin() -> bool:
    """``PHIBUILD_REPIN=1``: accept bytes that differ from the lock under an unchanged key, and say so."""
    return switch("PHIBUILD_REPIN")


class Project:
    def __init__(self, config: Config):
        self.config = config
        self.root = config.root
        self.store = Store(self.root / config.store)
        lock = self.root / config.lock
        self.lock = Lockfile(lock, self.store.locks / f"lockfile-{digest_json(str(lock))[:16]}.lock")
        self.store.register(lock)
        self.remote = (Remote(config.remote, config.remote_options, config.remote_timeout,
                              config.remote_transfer_timeout, config.trusted_keys, signing.from_environment())
                       if config.remote else NoRemote())
        self._targets: tuple[list[Target], list[LeftOut], list[str]] | None = None
        self.toolchains: dict[str, Managed | Own] = {name: chosen(name, config.toolchains) for name in declare.NAMES}
        self._toolchains: dict[str, Toolchain] = {}

    @classmethod
    def load(cls, root: Path | None = None) -> Project:
        return cls(load(root or Path.cwd()))

    # -- targets ---------------------------------------------------------------------------------

    def targets(self) -> tuple[list[Target], list[LeftOut]]:
        """Every buildable target, and each model, precision and backend that is left out and why."""
        return self._listed()[:2]

    def unavailable_backends(self) -> list[str]:
        """Backends the settings ask for whose toolchain cannot run here (no lock for this interpreter and
        platform, an own environment's interpreter missing), each with why."""
        return self._listed()[2]

    def _listed(self) -> tuple[list[Target], list[LeftOut], list[str]]:
        if self._targets is None:
            self._targets = self._list_targets()
        return self._targets

    def _list_targets(self) -> tuple[list[Target], list[LeftOut], list[str]]:
        found, skipped, unavailable_here = [], [], []
        architectures = {name: self.architecture(self.config.model(name)) for name in self.config.models}
        for backend_name in self.config.backends:
            backend = backends.get(backend_name)
            unavailable = self.toolchains[backend.toolchain].unavailable()
            if unavailable:
                unavailable_here.append(f"{backend_name} ({unavailable})")
                continue
            packages = self.toolchain(backend).packages
            for model_name in self.config.models:
                model, arch = self.config.model(model_name), architectures[model_name]
                for precision in self.config.precisions:
                    params = backend.params(precision, self.config.overrides(backend_name, precision),
                                            arch in VISION_ARCHITECTURES)
                    reason = arch and backend.refuse(arch, precision, params, packages)
                    if reason:
                        skipped.append(LeftOut(model_name, precision, backend_name, reason))
                    else:
                        found.append(Target(model, precision, backend, params))
        return found, skipped, unavailable_here

    def target(self, name: str) -> Target:
        """A target by its task name, or a clear error saying why there is none."""
        found, skipped = self.targets()
        for target in found:
            if target.name == name:
                return target
        for item in skipped:
            if item.name == name:
                backend = backends.get(item.backend)
                raise UnsupportedError(f"{name}: {backend.title} cannot build it: {item.reason}")
        close = difflib.get_close_matches(name, [target.name for target in found], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise PhibuildError(f"no target {name!r}{hint} (`doit list` shows them)")

    def architecture(self, model: ModelSpec) -> str | None:
        """Known up front for catalog models, read from config.json for local ones; None if unknown yet."""
        if model.architecture:
            return model.architecture
        if model.path is not None:
            try:
                return sources.architecture(model.path)
            except SourceError:
                return None
        return None

    def visible(self, name: str) -> Path:
        """Where the artifact of target ``name`` is shown to the user."""
        return self.root / self.config.build / name

    def shown(self, path: Path) -> Path:
        """``path`` relative to the project when it is inside it (messages and lock entries), else as is."""
        return path.relative_to(self.root) if path.is_relative_to(self.root) else path

    # -- keys ------------------------------------------------------------------------------------

    def toolchain(self, backend: Backend) -> Toolchain:
        """What ``backend`` builds with, as its key records it: its toolchain's lock, or what the environment the
        settings name for it holds."""
        return self.toolchains[backend.toolchain].record(backend.name)

    def facts(self, backend: Backend) -> Callable[[], dict[str, str]]:
        """``backend``'s facts about its toolchain's environment, found when first asked (which makes it)."""
        return lambda: self.toolchains[backend.toolchain].facts(backend.name)

    def plan(self, target: Target, fetch: bool = False) -> Plan:
        """The target's cache key. A hub model pinned in the lock is not downloaded unless ``fetch``."""
        model, entry = target.model, self.lock.get(target.name)
        revision, source = None, None
        if model.repo:
            locked = entry is not None and entry.source == self.origin(model)  # built from this origin
            revision = self._pinned_revision(model, entry.revision if locked else None)
            if fetch or revision is None or not locked:
                revision = revision or sources.resolve_revision(model)
                source = sources.fetch(model, revision, self.store.statcache)
                digest = source.digest
            else:
                digest = entry.parts.source
        else:
            source = sources.local_source(model, self.store.statcache)
            digest = source.digest
        backend = target.backend
        parts = KeyParts(digest, backend.name, self.toolchain(backend), target.precision, dict(target.params),
                         f"{RECIPE}.{backend.recipe}", backend.machine(self.facts(backend), target.params),
                         model.trust_remote_code)
        return Plan(target, parts, revision, source)

    def fetched(self, plan: Plan) -> Plan:
        """``plan`` with its source on disk: a pinned hub model is downloaded only when it must be built."""
        if plan.source is not None:
            return plan
        fetched = self.plan(plan.target, fetch=True)
        if fetched.key != plan.key:
            raise SourceError(f"{plan.target.name}: {plan.target.model.repo}@{plan.revision} no longer has the "
                              "files artifacts.lock pins (source digest changed); rebuild without the pin")
        return fetched

    @staticmethod
    def _pinned_revision(model: ModelSpec, locked_revision: str | None) -> str | None:
        """The commit asked for in full, else the one the lock pins for this model's origin."""
        if model.revision and FULL_SHA.match(model.revision):
            return model.revision
        return locked_revision

    def origin(self, model: ModelSpec) -> str:
        """Where the model's files come from, as artifacts.lock records it: a local path relative to the
        project, so that the lock does not change from one checkout to another."""
        if model.embedded:
            return f"embedded:{model.name}"
        if model.repo:
            return f"hf:{model.repo}" + (f"@{model.revision}" if model.revision else "")
        return f"path:{self.shown(model.path)}"

