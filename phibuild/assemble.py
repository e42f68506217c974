"""``doit assemble``: one artifacts.lock from the locks of CI jobs that each built a slice of the targets.

A slice lock is read like any other (every entry validated). Every artifact a slice changed must be in the
store or the remote with exactly the locked files, so that the assembled lock pins only what others can
restore.
"""

from __future__ import annotations

from pathlib import Path

from .errors import LockError
from .lockfile import Lockfile, merge
from .project import Project


def assemble(project: Project, slices: list[Path]) -> list[str]:
    """Write the project's lock from ``slices``; returns the targets taken from them."""
    base = project.lock.read()
    merged = merge(base, {str(path): Lockfile(path).read() for path in slices})
    taken = sorted(name for name, entry in merged.artifacts.items() if entry != base.artifacts.get(name))
    for name in taken:
        entry = merged.artifacts[name]
        stored = project.store.find(entry.key, entry.files)
        manifest = stored.manifest if stored is not None else project.remote.manifest(entry.key)
        if manifest is None or manifest.files != entry.files:
            raise LockError(f"{name}: key {entry.key} from a slice is not in {project.remote.caches} with the "
                            "files its lock pins; did that job push to the remote?")
    project.lock.put_all(merged)
    return taken
