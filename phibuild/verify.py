"""Checking artifacts against artifacts.lock: ``verify`` reads what is on disk, ``reproduce`` builds it again.

Both read every byte: unlike the freshness check, they trust no stat cache.
"""

from __future__ import annotations

from pathlib import Path

from .hashing import hash_file
from .project import Project, Target


def verify(project: Project) -> list[str]:
    """Every way the store and the visible artifacts differ from the lock, one line each (empty: all good).

    A visible file hardlinked to its store file is read once.
    """
    problems: list[str] = []
    seen: dict[tuple[int, int], dict] = {}
    for name, entry in sorted(project.lock.read().items()):
        stored = project.store.get(entry["key"])
        if stored is None:
            problems.append(f"{name}: key {entry['key']} is not in the store {project.store.root}")
        places = [("store", stored.artifact)] if stored else []
        places.append(("build", project.visible(name)))
        for place, directory in places:
            problems += [f"{name}: {place}: {problem}" for problem in _compare(directory, entry["files"], seen)]
    return problems


def _compare(directory: Path, files: dict[str, dict], seen: dict[tuple[int, int], dict]) -> list[str]:
    if not directory.is_dir():
        return [f"{directory} is missing"]
    problems = []
    for name, want in sorted(files.items()):
        path = directory / name
        try:
            st = path.stat()
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        inode = (st.st_dev, st.st_ino)
        if inode not in seen:
            seen[inode] = hash_file(path, with_sha256=True).as_dict()
        got = seen[inode]
        if got != want:
            problems.append(f"{name} differs: {_describe(got)}, locked {_describe(want)}")
    unlocked = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                      if p.is_file() and p.relative_to(directory).as_posix() not in files)
    problems += [f"{name} is not in artifacts.lock" for name in unlocked]
    return problems


def _describe(digest: dict) -> str:
    return f"{digest['size']} bytes, sha256 {digest['sha256'][:16]}"


def reproduce(project: Project, target: Target) -> list[str]:
    """Build ``target`` from scratch and return the files whose bytes differ from the lock (empty: the
    build is bit-reproducible), each with how."""
    entry = project.lock.get(target.name)
    if entry is None:
        return [f"{target.name} is not in artifacts.lock: build it first"]
    rebuilt = project.rebuild(target)
    problems = []
    for name in sorted(set(rebuilt) | set(entry["files"])):
        got, want = rebuilt.get(name), entry["files"].get(name)
        if got is None:
            problems.append(f"{name}: locked but not produced by the rebuild")
        elif want is None:
            problems.append(f"{name}: produced by the rebuild but not locked")
        elif got != want:
            problems.append(f"{name}: rebuilt {_describe(got)}, locked {_describe(want)}")
    return problems

