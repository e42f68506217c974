"""Making a target fresh, top to bottom::

    plan    the target's cache key (project.plan)
    obtain  the store's entry for the key, or the remote's, or a new build, pushed to the remote; each
            checked against the files artifacts.lock pins for the key (a build too: under an unchanged key,
            other bytes are an error, not a new pin)
            make: fetch the source, obtain the backend's intermediate the same way, run the backend in its
            toolchain's worker, keep the model's own code out, smoke-check the artifact in its runtime
    show    the entry under build/<target>
    lock    its entry in artifacts.lock

``rebuild`` runs the same making step into a scratch directory, bypassing every cache (``doit reproduce``).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import sources
from .backends import Job
from .catalog import VISION_ARCHITECTURES
from .errors import BuildError, LockError, UnsupportedError
from .hashing import FileDigest, digest_files
from .linking import link_file
from .project import Plan, Project, Target, frozen, repin, restore_only
from .records import INTERMEDIATE, KeyParts, LockEntry, Manifest, Pin, Smoke, differing_files
from .store import Entry, PinMismatch, described

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Made:
    """What making an entry adds to its manifest besides its files."""

    smoke: Smoke | None = None
    intermediate: Pin | None = None


def build(project: Project, target: Target) -> str:
    """Make ``target`` fresh; returns what was done, for the task's output."""
    plan = project.plan(target)
    locked = project.lock.get(target.name)
    if frozen():
        _check_frozen(target, locked, plan)
    pinned = locked.pinned(plan.key) if locked and not locked.smoke.unverified else None  # nobody vouched: no pin
    entry, how = obtain(project, plan.parts, target.name, pinned, lambda output: make(project, plan, locked, output))
    pin = lock_entry(project, plan, entry, locked)
    if frozen() and pin != locked:
        changed = [name for name, (old, new) in _fields(locked, pin).items() if old != new]
        raise LockError(f"{target.name}: artifacts.lock would change ({', '.join(changed)}) and PHIBUILD_FROZEN "
                        "is set, so it is left as it is; build without it and commit the lock")
    visible = project.visible(target.name)
    methods = project.store.show(entry, visible, target.backend.unlinkable,
                                 frozenset(locked.files) if locked else frozenset())
    if pin != locked:
        project.lock.put(target.name, pin)
    return f"{how}; shown at {project.shown(visible)} ({_placed(methods)})"


def obtain(project: Project, parts: KeyParts, label: str, pinned: dict[str, FileDigest] | None,
           make: Callable[[Path], Made]) -> tuple[Entry, str]:
    """The store entry for ``parts`` and how it came: from the store, else the remote, else made now (and
    pushed). ``pinned``: the files artifacts.lock expects under this key, if it pins it. One process at a
    time per key: a second one waits, then finds it."""
    key = parts.key
    with project.store.locked(key):
        try:
            entry = project.store.find(key, pinned)
        except PinMismatch as mismatch:
            if repin():
                log.warning("%s: %s; re-pinned to the store's entry (PHIBUILD_REPIN)", label, mismatch)
                return mismatch.entry, "restored from the store"
            log.warning("%s: %s; building it again to tell which is right", label, mismatch)
            entry = seal(project, parts, label, pinned, make, instead_of=mismatch.entry)
            return entry, "built again: the store's entry was not the one the lock pins, and the build agrees with it"
        if entry is not None:
            return entry, "restored from the store"
        entry = project.remote.pull(key, pinned, project.store)
        if entry is not None:
            return entry, f"pulled from the remote {project.remote.url}"
        if restore_only():
            failed = f" (the remote failed: {project.remote.failure})" if project.remote.failure else ""
            raise BuildError(f"{label}: key {key} is not in {project.remote.caches}{failed}, and "
                             "PHIBUILD_RESTORE_ONLY is set")
        entry = seal(project, parts, label, pinned, make)
        project.remote.push(entry)
        return entry, "built"


def seal(project: Project, parts: KeyParts, label: str, pinned: dict[str, FileDigest] | None,
         make: Callable[[Path], Made], instead_of: Entry | None = None) -> Entry:
    """Run ``make(output)`` in a fresh build directory, check what it wrote, and publish it under its key.
    Anything that fails leaves nothing in the store. ``instead_of``: the store's entry under the key, which
    differs from the lock's pin; the build tells which of the two is right, and replaces it only if the lock is."""
    with project.store.building() as build_dir:
        output = build_dir / "artifact"
        output.mkdir()
        made = make(output)
        files = digest_files(output)
        if not files:
            raise BuildError(f"{label}: the build wrote no files")
        if pinned is not None and files != pinned:
            if instead_of is not None and files == instead_of.files:
                raise LockError(f"{label}: artifacts.lock pins other files for key {parts.key} than the store holds "
                                f"({described(instead_of.files, pinned)}), and building it again gives the store's: "
                                "the lock was edited. Restore artifacts.lock from git; the store's entry is kept")
            _differ_from_lock(label, parts.key, pinned, files)
        if instead_of is not None:  # the build agrees with the lock: the store's entry was forged or is stale
            project.store.remove(parts.key)
        manifest = Manifest(parts.key, label, parts, files, made.smoke, made.intermediate)
        return project.store.publish(build_dir, manifest)


def make(project: Project, plan: Plan, locked: LockEntry | None, output: Path) -> Made:
    """Build the artifact of ``plan`` into ``output`` and smoke-check it."""
    plan = project.fetched(plan)
    target, source = plan.target, plan.source
    _check_source(project, target, source.directory)
    intermediate = obtain_intermediate(project, plan, locked)
    log.info("building %s: %s %s (key %s)", target.name, target.backend.title, target.precision, plan.key[:12])
    job = _job(plan, output, intermediate.artifact if intermediate else None)
    _, smoke = run(project, plan, [_build_step(plan, job), _smoke_step(plan, job)])
    log.info("smoke check of %s: %s", target.name, smoke)
    _check_unchanged(project, plan, target.name)
    return Made(Smoke(smoke), Pin(intermediate.key, intermediate.files) if intermediate else None)


def smoke_check(project: Project, plan: Plan, job: Job) -> str:
    """Run the artifact in ``job.output`` in its runtime, as users will: what the check said, in one line."""
    smoke = run(project, plan, [_smoke_step(plan, job)])[0]
    log.info("smoke check of %s: %s", plan.target.name, smoke)
    return smoke


def run(project: Project, plan: Plan, steps: list[dict[str, Any]]) -> list[Any]:
    """``steps`` run by one worker of the target's toolchain."""
    return project.toolchains[plan.target.backend.toolchain].run(steps, steps[0]["failure"])


def step(verb: str, plan: Plan, job: Job, failure: str, **more: Any) -> dict[str, Any]:
    """A worker's step for the target's backend (``phibuild.work`` runs it)."""
    return {"verb": verb, "backend": plan.target.backend.name, "job": job.to_dict(), "failure": failure, **more}


def _build_step(plan: Plan, job: Job) -> dict[str, Any]:
    """The backend's build; the model's own code is then kept out of the artifact unless the model opted in."""
    return step("build", plan, job, f"{plan.target.name}: {plan.target.backend.title} failed")


def _smoke_step(plan: Plan, job: Job) -> dict[str, Any]:
    target = plan.target
    return step("smoke", plan, job, f"{target.name}: the smoke check in {target.backend.title}'s runtime failed",
                artifact=str(job.output))


def checked_here(project: Project, target: Target, entry: Entry) -> str:
    """The smoke check of a stored artifact run on this machine (on links to its files in a scratch directory,
    so that a runtime writing beside a model cannot touch the store)."""
    plan = project.fetched(project.plan(target))
    project.store.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smoke-", dir=project.store.tmp) as scratch:
        for name in entry.files:
            copy = Path(scratch) / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            link_file(entry.artifact / name, copy)
        return smoke_check(project, plan, _job(plan, Path(scratch)))


def obtain_intermediate(project: Project, plan: Plan, locked: LockEntry | None) -> Entry | None:
    """The backend's shared first step for this target (GGUF: the conversion), obtained like an artifact."""
    target, backend = plan.target, plan.target.backend
    params = backend.intermediate(target.precision, target.params)
    if params is None:
        return None
    parts = replace(plan.parts, backend=f"{backend.name}-intermediate", precision=INTERMEDIATE, params=params,
                    machine=backend.machine(project.facts(backend), params))
    label = f"{target.model.name}-{backend.name}-{'-'.join(str(value) for value in params.values())}"
    # an artifact pulled unvouched vouches for nothing, its intermediate's files included
    pinned = locked.intermediate_files(parts.key) if locked and not locked.smoke.unverified else None

    def make_intermediate(output: Path) -> Made:
        log.info("building %s: %s intermediate %s (key %s)", label, backend.title, params, parts.key[:12])
        job = replace(_job(plan, output), params=params)
        run(project, plan, [step("build_intermediate", plan, job, f"{label}: {backend.title} intermediate failed")])
        _check_unchanged(project, plan, label)
        return Made()

    entry, _ = obtain(project, parts, label, pinned, make_intermediate)
    return entry


def rebuild(project: Project, target: Target) -> tuple[dict[str, FileDigest], dict[str, FileDigest] | None]:
    """Build ``target`` again from its source into a scratch directory, bypassing the store, the remote and
    cached intermediates, and return its files' digests and its intermediate's (None without one). Nothing is
    published, locked or shown."""
    plan = project.fetched(project.plan(target))
    _check_source(project, target, plan.source.directory)
    project.store.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rebuild-", dir=project.store.tmp) as scratch:
        intermediate, steps = None, []
        params = target.backend.intermediate(target.precision, target.params)
        if params is not None:
            intermediate = Path(scratch) / "intermediate"
            intermediate.mkdir()
            steps.append(step("build_intermediate", plan, replace(_job(plan, intermediate), params=params),
                              f"{target.name}: {target.backend.title} intermediate failed"))
        output = Path(scratch) / "artifact"
        output.mkdir()
        log.info("rebuilding %s from scratch", target.name)
        run(project, plan, [*steps, _build_step(plan, _job(plan, output, intermediate))])
        return digest_files(output), digest_files(intermediate) if intermediate else None


def lock_entry(project: Project, plan: Plan, entry: Entry, locked: LockEntry | None) -> LockEntry:
    """The lock entry for ``entry``. Where the lock already pins these files under this key, its record of
    the smoke check stands, and its fidelity record: the artifact is the one that was checked and measured."""
    target = plan.target
    smoke, fidelity = entry.manifest.smoke, None
    if locked is not None and locked.key == entry.key and locked.files == entry.files:
        smoke, fidelity = locked.smoke, locked.fidelity
    license = plan.source.license if plan.source else locked.license if locked else None
    return LockEntry(target.model.name, project.origin(target.model), plan.parts, entry.key, entry.files, smoke,
                     plan.revision, entry.manifest.intermediate, license, fidelity)


def _job(plan: Plan, output: Path, intermediate: Path | None = None) -> Job:
    target = plan.target
    vision = sources.architecture(plan.source.directory) in VISION_ARCHITECTURES
    return Job(plan.source.directory, output, target.precision, dict(target.params), intermediate,
               target.model.trust_remote_code, vision)


def _check_source(project: Project, target: Target, directory: Path) -> None:
    architecture = sources.architecture(directory)
    if architecture in VISION_ARCHITECTURES and target.model.architecture is None and target.model.path is None:
        # Its defaults and its fidelity step are chosen before anything is downloaded.
        raise UnsupportedError(f"{target.name}: {architecture} reads images, which phibuild learns of only after "
                               "downloading it; download the checkpoint and point "
                               f"[tool.phibuild.model.{target.model.name}] path = ... at it")
    reason = target.backend.refuse(architecture, target.precision, target.params,
                                   project.toolchain(target.backend).packages)
    if reason:
        raise UnsupportedError(f"{target.name}: {target.backend.title} cannot build {architecture}: {reason}")
    sources.check_checkpoint(directory)


def _check_unchanged(project: Project, plan: Plan, label: str) -> None:
    source = plan.source
    now = sources.digest_directory(source.directory, project.store.statcache, plan.target.model.trust_remote_code)
    if now != source.files:
        raise BuildError(f"{label}: the source files changed during the build; build again")


def _differ_from_lock(label: str, key: str, pinned: dict[str, FileDigest], files: dict[str, FileDigest]) -> None:
    """Bytes other than the lock's under the same key: refused unless PHIBUILD_REPIN says to accept them."""
    changes = [f"{name} {_sha(pinned.get(name))} -> {_sha(files.get(name))}" for name in differing_files(pinned, files)]
    if not repin():
        raise LockError(
            f"{label}: built again under the same key {key}, but {len(changes)} files differ from artifacts.lock "
            f"({'; '.join(changes)}). Something that changes the bytes is missing from the key (a package, "
            "a setting, a CPU-dependent kernel), or the lock was edited. Nothing was re-pinned. To accept the "
            f"new bytes: PHIBUILD_REPIN=1 doit quantize:{label}")
    log.warning("%s: re-pinned under the unchanged key %s (PHIBUILD_REPIN): %s", label, key, "; ".join(changes))


def _sha(digest: FileDigest | None) -> str:
    return "(none)" if digest is None else f"sha256 {digest.sha256[:12]}"


def _check_frozen(target: Target, locked: LockEntry | None, plan: Plan) -> None:
    if locked is None:
        raise LockError(f"{target.name}: not in artifacts.lock and PHIBUILD_FROZEN is set; "
                        "build it without PHIBUILD_FROZEN and commit the lock")
    changes = plan.parts.differences(locked.parts)
    if changes:
        raise LockError(f"{target.name}: artifacts.lock would change ({'; '.join(changes)}) and "
                        "PHIBUILD_FROZEN is set; rebuild without it and commit the lock")


def _fields(old: LockEntry | None, new: LockEntry) -> dict[str, tuple]:
    """Each lock entry field, old and new, for saying which changed."""
    before = old.to_dict() if old else {}
    after = new.to_dict()
    return {name: (before.get(name), after.get(name)) for name in sorted(before.keys() | after.keys())}


def _placed(methods: dict[str, str]) -> str:
    """How the files were shown: "3 hardlinks, 1 copy"."""
    counts = Counter(methods.values())
    plural = {"copy": "copies", "hardlink": "hardlinks", "reflink": "reflinks"}
    return ", ".join(f"{n} {plural[method] if n > 1 else method}" for method, n in sorted(counts.items()))
