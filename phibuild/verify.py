"""Checking artifacts against artifacts.lock: ``verify`` reads what is on disk, ``reproduce`` builds it again.

Both read every byte: unlike the freshness check, they trust no stat cache. Both act on the targets this
project is configured to build; a locked target that was never built on this machine is not damage, and is
counted instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from .build import checked_here, rebuild
from .errors import DamageError
from .hashing import FileDigest, hash_file
from .project import Project, Target
from .records import LockEntry, Smoke, differing_files

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What ``verify`` found: one line per problem, and the targets with nothing on this machine to check."""

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    not_built: list[str] = field(default_factory=list)  # locked here, but neither in the store nor in build/
    not_locked: list[str] = field(default_factory=list)  # configured, but not in artifacts.lock


def verify(project: Project) -> Report:
    """Every way the store and the visible artifacts of the configured targets differ from the lock.

    A visible file hardlinked to its store file is read once.
    """
    report = Report()
    lock = project.lock.read().artifacts
    seen: dict[tuple[int, int], FileDigest] = {}
    found, _ = project.targets()
    for name in sorted(target.name for target in found):
        entry = lock.get(name)
        if entry is None:
            report.not_locked.append(name)
            continue
        places = []
        try:
            stored = project.store.get(entry.key)
        except DamageError as exc:
            report.problems.append(f"{name}: store: {exc}")
            stored = None
        if stored is not None:
            places.append(("store", stored.artifact))
        visible = project.visible(name)
        if visible.exists() or stored is not None:
            places.append(("build", visible))
        if not places:
            report.not_built.append(name)
            continue
        report.checked.append(name)
        for place, directory in places:
            report.problems += [f"{name}: {place}: {problem}" for problem in _compare(directory, entry, seen)]
    return report


def _compare(directory: Path, entry: LockEntry, seen: dict[tuple[int, int], FileDigest]) -> list[str]:
    if not directory.is_dir():
        return [f"{directory} is missing"]
    problems = []
    for name, want in sorted(entry.files.items()):
        path = directory / name
        try:
            st = path.stat()
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        inode = (st.st_dev, st.st_ino)
        if inode not in seen:
            seen[inode] = hash_file(path, with_sha256=True)
        got = seen[inode]
        if got != want:
            problems.append(f"{name} differs: {_describe(got)}, locked {_describe(want)}")
    unlocked = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                      if p.is_file() and p.relative_to(directory).as_posix() not in entry.files)
    problems += [f"{name} is not in artifacts.lock" for name in unlocked]
    return problems


def _describe(digest: FileDigest) -> str:
    return f"{digest.size} bytes, sha256 {digest.sha256[:16]}"


def reproduce(project: Project, target: Target, entry: LockEntry | None) -> list[str]:
    """Build ``target`` from scratch and return how its files differ from ``entry`` (a lock entry of this
    project's lock or of another machine's; empty: the build is bit-reproducible), one line per file."""
    if entry is None:
        return [f"{target.name} is not in the lock: build it first"]
    plan = project.plan(target)
    if plan.key != entry.key:
        changes = plan.parts.differences(entry.parts)
        log.info("%s: the key here is %s, the lock's %s (%s); comparing the bytes all the same", target.name,
                 plan.key[:12], entry.key[:12], "; ".join(changes) or "same components")
    problems = []
    rebuilt, intermediate = rebuild(project, target)
    if entry.intermediate and intermediate != entry.intermediate.files:
        problems.append(f"its intermediate: rebuilt, it is not what the lock pins ("
                        f"{', '.join(differing_files(intermediate or {}, entry.intermediate.files))})")
    for name in sorted(set(rebuilt) | set(entry.files)):
        got, want = rebuilt.get(name), entry.files.get(name)
        if got is None:
            problems.append(f"{name}: locked but not produced by the rebuild")
        elif want is None:
            problems.append(f"{name}: produced by the rebuild but not locked")
        elif got != want:
            problems.append(f"{name}: rebuilt {_describe(got)}, locked {_describe(want)}")
    return problems


def vouch(project: Project, target: Target, entry: LockEntry) -> None:
    """After ``reproduce`` rebuilt a pulled, unvouched artifact to the same bytes: run its smoke check here too,
    and pin it as this machine's own (release and publish ship it from then on)."""
    stored = project.store.find(entry.key, entry.files)
    if stored is None:
        return
    result = checked_here(project, target, stored)
    project.lock.put(target.name, replace(entry, smoke=Smoke(result)))
    log.info("%s: pulled from %s, rebuilt here to the same bytes and smoke-checked here: vouched for in "
             "artifacts.lock", target.name, entry.smoke.pulled_from)
