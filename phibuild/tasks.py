"""doit tasks: one ``quantize:<model>-<precision>-<backend>`` per target, as plain task dictionaries.

Use from a ``dodo.py``::

    from phibuild.tasks import dodo_config, task_quantize  # noqa: F401

    DOIT_CONFIG = dodo_config()

Freshness is decided by phibuild's cache key (see project.py), through an ``uptodate`` object whose text
is the reason a task is stale, which is what ``doit info quantize:<name>`` prints. doit's own MD5 file
checks are not used: weights are never hashed by doit. phibuild's errors reach the user as one message,
never a traceback: bad settings as doit's "ERROR:", a failed build as a failed task.
"""

from __future__ import annotations

import os
from pathlib import Path

from doit.exceptions import InvalidTask, TaskFailed

from .errors import PhibuildError
from .project import Project, Target

_projects: dict[tuple[int, Path], Project] = {}


def project(root: Path | None = None) -> Project:
    """This process's Project for ``root`` (doit -n forks workers: each opens its own store handles)."""
    root = (root or Path.cwd()).resolve()
    key = (os.getpid(), root)
    if key not in _projects:
        _projects[key] = Project.load(root)
    return _projects[key]


def forget_projects() -> None:
    """Drop this process's Projects, so the next use re-reads ``pyproject.toml`` (for in-process doit runs)."""
    for proj in _projects.values():
        proj.store.statcache.close()
    _projects.clear()


class Fresh:
    """doit ``uptodate`` callable; after a call, ``str(self)`` says why the task is stale."""

    def __init__(self, root: Path, name: str):
        self.root, self.name, self.reason = root, name, "not checked yet"

    def __call__(self, task, values) -> bool:
        try:
            proj = project(self.root)
            self.reason = proj.status(proj.target(self.name)) or "up to date"
        except PhibuildError as exc:
            self.reason = str(exc)
        return self.reason == "up to date"

    def __str__(self) -> str:
        return self.reason


def build(root: str, name: str) -> str | TaskFailed:
    """The task action: make one target fresh. A phibuild error fails the task with its message alone."""
    try:
        proj = project(Path(root))
        message = f"phibuild: {name}: {proj.build(proj.target(name))}"
    except PhibuildError as exc:
        return TaskFailed(f"phibuild: {exc}")
    print(message, flush=True)
    return message


def clean(root: str, name: str) -> None:
    proj = project(Path(root))
    proj.clean(proj.target(name))


def quantize_tasks(root: Path | None = None):
    """Yield the task dictionaries of every buildable target of the project at ``root``."""
    try:
        proj = project(root)
        found, skipped = proj.targets()
    except PhibuildError as exc:
        raise InvalidTask(f"phibuild: {exc}") from None
    yield {
        "basename": "quantize",
        "name": None,
        "doc": f"Quantize Phi models: {len(found)} targets"
        + (f"; left out: {'; '.join(skipped)}" if skipped else ""),
    }
    root_text = str(proj.root)
    for target in found:
        yield {
            "basename": "quantize",
            "name": target.name,
            "doc": _doc(target),
            "actions": [(build, [root_text, target.name])],
            "uptodate": [Fresh(proj.root, target.name)],
            "targets": [str(proj.visible(target))],
            "clean": [(clean, [root_text, target.name])],
            "verbosity": 2,
        }


def _doc(target: Target) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(target.params.items()))
    source = target.model.repo or ("embedded" if target.model.embedded else str(target.model.path))
    return f"{target.model.name} ({source}) -> {target.backend.title} {target.precision} [{params}]"


def task_quantize():
    """Quantize Phi models into content-addressed, locked artifacts."""
    yield from quantize_tasks()


DOIT_CONFIG = {"subtasks": True}  # `doit list` shows every target, not just the group


def dodo_config(root: Path | None = None) -> dict:
    """DOIT_CONFIG for a project: its ``default`` targets become doit's default tasks (without
    any, plain ``doit`` builds every target).

    A broken ``[tool.phibuild]`` is reported when doit loads the tasks (as "ERROR: ..."), not here,
    where an exception would reach the user as a traceback.
    """
    try:
        defaults = project(root).config.default
    except PhibuildError:
        defaults = []
    if not defaults:
        return dict(DOIT_CONFIG)
    return {**DOIT_CONFIG, "default_tasks": [f"quantize:{name}" for name in defaults]}
