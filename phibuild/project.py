"""A phibuild project: its targets, and for each one whether it is fresh and how to make it so.

A target is up to date exactly when its cache key equals the key pinned in ``artifacts.lock``, the store
holds that key with the locked file digests, and the visible copy under ``build/`` shows those files.
Otherwise the build action restores what it can (a key already in the store is linked, not rebuilt) and
builds the rest into a temporary directory that is verified, smoke-checked and only then published.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import backends, keys, sources
from .backends import Backend
from .catalog import ModelSpec
from .config import Config, load
from .errors import BuildError, LockError, PhibuildError, SourceError, UnsupportedError
from .hashing import digest_files, digest_json
from .lockfile import Lockfile, merge
from .remote import Remote
from .store import Entry, Store

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")


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
    parts: dict[str, Any]
    key: str
    revision: str | None  # hub commit, when the model comes from the hub
    source: sources.Source | None  # None when a pinned hub source was not downloaded


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def frozen() -> bool:
    """``PHIBUILD_FROZEN=1``: fail instead of changing artifacts.lock (for CI)."""
    return _flag("PHIBUILD_FROZEN")


def restore_only() -> bool:
    """``PHIBUILD_RESTORE_ONLY=1``: take artifacts from the store or the remote, never build (CI fan-in)."""
    return _flag("PHIBUILD_RESTORE_ONLY")


class Project:
    def __init__(self, config: Config):
        self.config = config
        self.root = config.root
        self.store = Store(self.root / config.store)
        lock = self.root / config.lock
        self.lock = Lockfile(lock, self.store.locks / f"lockfile-{digest_json(str(lock))[:16]}.lock")
        self.remote = Remote(config.remote, config.remote_options, config.remote_timeout) if config.remote else None
        self._targets: tuple[list[Target], list[str]] | None = None

    @classmethod
    def load(cls, root: Path | None = None) -> Project:
        return cls(load(root or Path.cwd()))

    # -- targets ---------------------------------------------------------------------------------

    def targets(self) -> tuple[list[Target], list[str]]:
        """Every buildable target, and a note for each model/backend pair that is left out and why."""
        if self._targets is None:
            self._targets = self._list_targets()
        return self._targets

    def _list_targets(self) -> tuple[list[Target], list[str]]:
        found, skipped = [], []
        architectures = {name: self.architecture(self.config.model(name)) for name in self.config.models}
        for backend_name in self.config.backends:
            backend = backends.get(backend_name)
            if not backend.installed():
                skipped.append(f"{backend_name}: not installed (pip install 'phibuild[{backend.extra}]')")
                continue
            for model_name in self.config.models:
                model, arch = self.config.model(model_name), architectures[model_name]
                for precision in self.config.precisions:
                    params = backend.params(precision, self.config.overrides(backend_name, precision))
                    reason = arch and backend.refuse(arch, precision, params)
                    if reason:
                        skipped.append(f"{model_name}-{precision}-{backend_name}: {reason}")
                    else:
                        found.append(Target(model, precision, backend, params))
        return found, skipped

    def target(self, name: str) -> Target:
        """A target by its task name, or a clear error saying why there is none."""
        found, skipped = self.targets()
        for target in found:
            if target.name == name:
                return target
        for note in skipped:
            if note.startswith(f"{name}:"):
                raise UnsupportedError(note)
        raise PhibuildError(f"no target {name!r}; `doit list --all` shows them")

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

    @property
    def _caches(self) -> str:
        """Where a key can be found without building it, for messages."""
        return "the store or the remote" if self.remote else "the store (no remote is set)"

    def shown(self, path: Path) -> Path:
        """``path`` relative to the project when it is inside it (messages and lock entries), else as is."""
        return path.relative_to(self.root) if path.is_relative_to(self.root) else path

    # -- keys ------------------------------------------------------------------------------------

    def plan(self, target: Target, fetch: bool = False) -> Plan:
        """The target's cache key. A hub model pinned in the lock is not downloaded unless ``fetch``."""
        model, entry = target.model, self.lock.get(target.name)
        revision, source = None, None
        if model.repo:
            locked = entry is not None and entry.get("source") == self.origin(model)  # built from this origin
            revision = self._pinned_revision(model, entry if locked else None)
            if fetch or revision is None or not locked:
                revision = revision or sources.resolve_revision(model)
                source = sources.fetch(model, revision, self.store.statcache)
                digest = source.digest
            else:
                digest = entry["source_digest"]
        else:
            source = sources.local_source(model, self.store.statcache)
            digest = source.digest
        backend = target.backend
        parts = keys.components(digest, backend.name, backend.versions(), target.precision, target.params,
                                backend.recipe)
        return Plan(target, parts, keys.cache_key(parts), revision, source)

    def _pinned_revision(self, model: ModelSpec, entry: dict | None) -> str | None:
        """The commit asked for in full, else the one ``entry`` (built from this model's origin) pins."""
        if model.revision and FULL_SHA.match(model.revision):
            return model.revision
        return entry.get("revision") if entry else None

    def origin(self, model: ModelSpec) -> str:
        """Where the model's files come from, as artifacts.lock records it: a local path relative to the
        project, so that the lock does not change from one checkout to another."""
        if model.embedded:
            return f"embedded:{model.name}"
        if model.repo:
            return f"hf:{model.repo}" + (f"@{model.revision}" if model.revision else "")
        return f"path:{self.shown(model.path)}"

    # -- status ----------------------------------------------------------------------------------

    def status(self, target: Target) -> str | None:
        """None when the target is up to date, else the reason it is not (for ``doit info``)."""
        entry = self.lock.get(target.name)
        if entry is None:
            return "not built yet: no entry in artifacts.lock"
        if entry.get("source") != self.origin(target.model):
            return f"model source changed: {entry.get('source')} -> {self.origin(target.model)}"
        try:
            plan = self.plan(target)
        except PhibuildError as exc:
            return str(exc)
        changes = keys.explain(entry, plan.parts)
        if changes:
            return "cache key changed: " + "; ".join(changes)
        if entry.get("key") != plan.key:
            return "artifacts.lock entry has a different key (edited by hand?)"
        stored = self.store.get(plan.key)
        if stored is None:
            return f"artifact {plan.key} is not in the store {self.store.root}"
        damaged = self.store.damaged_files(stored, entry["files"])
        if damaged:
            return f"store files differ from artifacts.lock: {', '.join(damaged)}"
        if not self.store.visible_matches(stored, self.visible(target.name)):
            return f"{self.visible(target.name)} is missing or modified (restorable from the store)"
        return None

    # -- build -----------------------------------------------------------------------------------

    def build(self, target: Target) -> str:
        """Make the target fresh: restore it (from the store or the remote) or build it, show it, pin it.

        Returns what it did, for the task's output.
        """
        plan = self.plan(target)
        locked = self.lock.get(target.name)
        if frozen():
            self._check_frozen(target, locked, plan)
        expected = locked["files"] if locked and locked.get("key") == plan.key else None
        stored, action = self._obtain(plan.key, target.name, expected,
                                      lambda: self._build_into_store(self._fetched(plan)))
        entry = self._lock_entry(plan, stored)
        if frozen() and entry != locked:
            changed = [f"files {', '.join(_differing(locked['files'], entry['files']))}" if field == "files" else field
                       for field in _differing(locked, entry)]
            raise LockError(f"{target.name}: artifacts.lock would change ({'; '.join(changed)}) and "
                            "PHIBUILD_FROZEN is set, so it is left as it is; build without it and commit the lock")
        how = self.store.link_visible(stored, self.visible(target.name), target.backend.unlinkable)
        if entry != locked:
            self.lock.put(target.name, entry)
        return f"{action}; shown at {self.shown(self.visible(target.name))} by {how}"

    def _obtain(self, key: str, label: str, expected: dict | None, build: Callable[[], Entry]) -> tuple[Entry, str]:
        """The store entry for ``key`` and how it came: from the store, else the remote, else ``build()``
        (and then pushed). One process at a time per key: a second one waits, then finds it."""
        with self.store.locked(key):
            stored = self._intact(key, label)
            if stored is not None:
                return stored, "restored from the store"
            if self.remote is not None:
                stored = self.remote.pull(key, self.store, expected)
                if stored is not None:
                    return stored, f"pulled from the remote {self.remote.url}"
            if restore_only():
                raise BuildError(f"{label}: key {key} is not in {self._caches}, and PHIBUILD_RESTORE_ONLY is set")
            stored = build()
            if self.remote is not None:
                self.remote.push(stored)
            return stored, "built"

    def _fetched(self, plan: Plan) -> Plan:
        """``plan`` with its source on disk: a pinned hub model is downloaded only when it must be built."""
        if plan.source is not None:
            return plan
        fetched = self.plan(plan.target, fetch=True)
        if fetched.key != plan.key:
            raise BuildError(f"{plan.target.name}: {plan.target.model.repo}@{plan.revision} no longer has the "
                             "files artifacts.lock pins (source digest changed); rebuild without the pin")
        return fetched

    def _intact(self, key: str, label: str) -> Entry | None:
        """The store entry for ``key`` if it is complete and undamaged; a damaged one is removed."""
        stored = self.store.get(key)
        if stored is not None and self.store.damaged_files(stored):
            print(f"phibuild: store entry {key} of {label} is damaged; rebuilding it", flush=True)
            self.store.remove(key)
            return None
        return stored

    def _check_frozen(self, target: Target, locked: dict | None, plan: Plan) -> None:
        if locked is None:
            raise LockError(f"{target.name}: not in artifacts.lock and PHIBUILD_FROZEN is set; "
                            "build it without PHIBUILD_FROZEN and commit the lock")
        changes = keys.explain(locked, plan.parts)
        if changes:
            raise LockError(f"{target.name}: artifacts.lock would change ({'; '.join(changes)}) and "
                            "PHIBUILD_FROZEN is set; rebuild without it and commit the lock")

    def _build_into_store(self, plan: Plan) -> Entry:
        target, source = plan.target, plan.source
        architecture = sources.architecture(source.directory)
        reason = target.backend.refuse(architecture, target.precision, target.params)
        if reason:
            raise UnsupportedError(f"{target.name}: {reason}")
        sources.check_checkpoint(source.directory)
        intermediate = self._intermediate(plan)
        shared = intermediate.artifact if intermediate else None

        def make(output: Path) -> dict:
            target.backend.build(source.directory, output, target.precision, target.params, shared)
            smoke = target.backend.smoke(output, target.params)
            print(f"phibuild: smoke check of {target.name}: {smoke.summary()}", flush=True)
            return {"smoke": smoke.summary(), **({"intermediate": intermediate.key} if intermediate else {})}

        return self._seal(plan.key, target.name, plan.parts, source, make, f"{target.backend.title} {target.precision}")

    def _intermediate(self, plan: Plan) -> Entry | None:
        """The backend's shared first step for this target, from the store or built into it now."""
        target, backend = plan.target, plan.target.backend
        params = backend.intermediate(target.precision, target.params)
        if params is None:
            return None
        parts = keys.components(plan.parts["source"], f"{backend.name}-intermediate", plan.parts["versions"],
                                "intermediate", params, backend.recipe)
        key = keys.cache_key(parts)
        label = f"{target.model.name}-{backend.name}-intermediate"
        source = plan.source

        def make(output: Path) -> dict:
            backend.build_intermediate(source.directory, output, params)
            return {}

        stored, _ = self._obtain(key, label, None, lambda: self._seal(
            key, label, parts, source, make, f"{backend.title} intermediate {params}"))
        return stored

    def _seal(self, key: str, label: str, parts: dict, source: sources.Source, make: Callable[[Path], dict],
              what: str) -> Entry:
        """Run ``make(output)`` in a fresh build directory, verify, and publish the result under ``key``.

        ``make`` returns extra manifest fields. Anything that fails leaves nothing in the store.
        """
        with self.store.building() as build_dir:
            output = build_dir / "artifact"
            output.mkdir()
            print(f"phibuild: building {label}: {what} (key {key[:12]})", flush=True)
            extra = make(output)
            if sources.digest_directory(source.directory, self.store.statcache) != source.files:
                raise BuildError(f"{label}: the source files changed during the build; build again")
            files = digest_files(output)
            if not files:
                raise BuildError(f"{label}: the build wrote no files")
            manifest = {"key": key, "target": label, "parts": parts, "files": files, **extra}
            return self.store.publish(build_dir, key, manifest)

    def _lock_entry(self, plan: Plan, stored: Entry) -> dict:
        target = plan.target
        entry = {
            "model": target.model.name,
            "source": self.origin(target.model),
            **{field: plan.parts[part] for part, field in keys.LOCK_FIELDS.items()},
            "key": plan.key,
            "files": stored.files,
            "smoke": stored.manifest["smoke"],
        }
        if stored.manifest.get("intermediate"):
            entry["intermediate"] = stored.manifest["intermediate"]
        if plan.revision:
            entry["revision"] = plan.revision
        return entry

    def rebuild(self, target: Target) -> dict[str, dict]:
        """Build ``target`` again from its source, bypassing the store, the remote and cached intermediates,
        and return its files' digests. Nothing is published, locked or shown."""
        plan = self._fetched(self.plan(target))
        backend, source = target.backend, plan.source.directory
        sources.check_checkpoint(source)
        self.store.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-rebuild-", dir=self.store.tmp) as scratch:
            shared = None
            params = backend.intermediate(target.precision, target.params)
            if params is not None:
                shared = Path(scratch) / "intermediate"
                shared.mkdir()
                backend.build_intermediate(source, shared, params)
            output = Path(scratch) / "artifact"
            output.mkdir()
            print(f"phibuild: rebuilding {target.name} from scratch", flush=True)
            backend.build(source, output, target.precision, target.params, shared)
            return digest_files(output)

    def assemble(self, slices: list[Path]) -> list[str]:
        """Write artifacts.lock from the locks of several CI jobs that each built a slice of the targets.

        Every artifact a slice changed must be in the store or the remote with exactly the locked files,
        so that the assembled lock pins only what others can restore. Returns the targets taken.
        """
        base = self.lock.read()
        merged = merge(base, {str(path): Lockfile(path).read() for path in slices})
        taken = sorted(name for name in merged if merged[name] != base.get(name))
        for name in taken:
            entry = merged[name]
            found = self._manifest(entry["key"])
            if found is None or found["files"] != entry["files"]:
                raise LockError(f"{name}: key {entry['key']} from a slice is not in {self._caches} with the "
                                "files its lock pins; did that job push to the remote?")
        self.lock.put_all(merged)
        return taken

    def _manifest(self, key: str) -> dict | None:
        """The manifest of ``key`` in the store, else on the remote, else None."""
        stored = self.store.get(key)
        if stored is not None:
            return stored.manifest
        return self.remote.has(key) if self.remote else None

    def clean(self, target: Target) -> None:
        """Remove the visible artifact; the store keeps it, so the next build restores it at once."""
        visible = self.visible(target.name)
        if visible.exists():
            shutil.rmtree(visible)
            print(f"phibuild: removed {self.shown(visible)} (kept in the store)")


def _differing(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between two dictionaries, sorted."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
