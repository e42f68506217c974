"""Whether a target is fresh, and if not, why: what ``doit info quantize:NAME`` prints.

A target is up to date exactly when its cache key equals the key pinned in ``artifacts.lock``, the store holds
that key with the locked file digests, and the visible copy under ``build/`` shows those files. This is the
check every no-op run makes for every target, so it reads no weights: files are judged by the stat cache.
"""

from __future__ import annotations

from .catalog import download_note
from .errors import DamageError, PhibuildError
from .project import Project, Target
from .records import differing_files


def status(project: Project, target: Target) -> str | None:
    """None when ``target`` is up to date, else the reason it is not."""
    entry = project.lock.get(target.name)
    if entry is None:
        if target.model.repo:
            return f"not built yet; building it downloads {download_note(target.model)}"
        return "not built yet: no entry in artifacts.lock"
    if entry.source != project.origin(target.model):
        return f"model source changed: {entry.source} -> {project.origin(target.model)}"
    try:
        plan = project.plan(target)
    except PhibuildError as exc:
        return str(exc)
    changes = plan.parts.differences(entry.parts)
    if changes:
        return "cache key changed: " + "; ".join(changes)
    try:
        stored = project.store.get(plan.key)
    except DamageError as exc:
        return f"the store entry is damaged ({exc}); it will be built again"
    if stored is None:
        return f"artifact {plan.key} is not in the store {project.store.root}"
    if stored.files != entry.files:
        differ = differing_files(stored.files, entry.files)
        return f"the store entry's files are not the ones artifacts.lock pins: {', '.join(differ)}"
    damaged = project.store.damaged_files(stored, entry.files)
    if damaged:
        return f"store files differ from artifacts.lock: {', '.join(damaged)}"
    if not project.store.visible_matches(stored, project.visible(target.name)):
        return f"{project.shown(project.visible(target.name))} is missing or modified (restorable from the store)"
    return None
