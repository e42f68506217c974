"""``doit gc``: the store entries no lock entry references (artifacts, their intermediates, fidelity references and
measurements), in this project's lock or any other project's that shares the store, and entries whose manifest
is damaged, with their sizes. Only what is proven to be an entry of the
store is ever removed: a directory named by a key under the fan-out directory of its first two digits, with no
symlink on the way (``Store.entries``, ``Store.remove_tree``). Anything else found there is named and left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .lockfile import Lockfile
from .project import Project

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Garbage:
    directory: Path
    label: str
    size: int


def garbage(project: Project) -> list[Garbage]:
    """What no project using the store references (each lock it has seen: ``Store.users``); a lock that cannot be
    read stops it, since then nothing can be proven unreferenced."""
    referenced: set[str] = set()
    for path in {project.lock.path, *project.store.users()}:
        lock = (project.lock if path == project.lock.path else Lockfile(path)).read().artifacts.values()
        referenced |= {entry.key for entry in lock}
        referenced |= {entry.intermediate.key for entry in lock if entry.intermediate}
        referenced |= {key for entry in lock if entry.fidelity for key in (entry.fidelity.reference,
                                                                           entry.fidelity.measurement)}
    entries, damaged, strays = project.store.entries()
    for stray in strays:
        log.warning("gc: %s is not a store entry (a symlink, a file or a stranger's name); left alone",
                    project.shown(stray))
    found = [Garbage(entry.directory, entry.manifest.label, sum(f.size for f in entry.files.values()))
             for entry in entries if entry.key not in referenced]
    found += [Garbage(path, "damaged", sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink()
                                           and p.is_file()))
              for path in damaged]
    return sorted(found, key=lambda g: g.directory.name)


def remove(project: Project, item: Garbage) -> None:
    project.store.remove_tree(item.directory)
