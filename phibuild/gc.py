"""``doit gc``: the store entries no lock entry references (artifacts, their intermediates, fidelity references and
measurements), and entries
whose manifest is damaged, with their sizes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .project import Project


@dataclass(frozen=True)
class Garbage:
    directory: Path
    label: str
    size: int


def garbage(project: Project) -> list[Garbage]:
    lock = project.lock.read().artifacts.values()
    referenced = {entry.key for entry in lock} | {entry.intermediate.key for entry in lock if entry.intermediate}
    referenced |= {key for entry in lock if entry.fidelity for key in (entry.fidelity.reference,
                                                                       entry.fidelity.measurement)}
    entries, damaged = project.store.entries()
    found = [Garbage(entry.directory, entry.manifest.label, sum(f.size for f in entry.files.values()))
             for entry in entries if entry.key not in referenced]
    found += [Garbage(path, "damaged", sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))
              for path in damaged]
    return sorted(found, key=lambda g: g.directory.name)


def remove(project: Project, item: Garbage) -> None:
    shutil.rmtree(item.directory)
    project.store.statcache.forget(item.directory)
