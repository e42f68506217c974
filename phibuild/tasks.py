"""doit tasks, as plain task dictionaries: one ``quantize:<model>-<precision>-<backend>`` per target, and
``verify``, ``reproduce:<target>``, ``release``, ``gc`` and ``assemble`` over what artifacts.lock pins.

Use from a ``dodo.py``::

    from phibuild.tasks import (  # noqa: F401
        dodo_config, task_assemble, task_gc, task_quantize, task_release, task_reproduce, task_verify,
    )

    DOIT_CONFIG = dodo_config()

Freshness is decided by phibuild's cache key (see project.py), through an ``uptodate`` object whose text
is the reason a task is stale, which is what ``doit info quantize:<name>`` prints. doit's own MD5 file
checks are not used: weights are never hashed by doit. phibuild's errors reach the user as one message,
never a traceback: bad settings as doit's "ERROR:", a failed build as a failed task.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from doit.exceptions import InvalidTask, TaskFailed

from . import release, verify
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

    def __call__(self, task: object, values: dict) -> bool:
        try:
            proj = project(self.root)
            self.reason = proj.status(proj.target(self.name)) or "up to date"
        except PhibuildError as exc:
            self.reason = str(exc)
        return self.reason == "up to date"

    def __str__(self) -> str:
        return self.reason


def _action(function: Callable) -> Callable:
    """A task action whose phibuild errors fail the task with their message alone, never a traceback."""

    @functools.wraps(function)  # doit reads the signature to pass command-line parameters
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except PhibuildError as exc:
            return TaskFailed(f"phibuild: {exc}")

    return run


@_action
def build(root: str, name: str) -> str:
    """The task action: make one target fresh."""
    proj = project(Path(root))
    message = f"phibuild: {name}: {proj.build(proj.target(name))}"
    print(message, flush=True)
    return message


@_action
def clean(root: str, name: str) -> None:
    proj = project(Path(root))
    proj.clean(proj.target(name))


@contextlib.contextmanager
def _settings_errors() -> Iterator[None]:
    """Broken settings or a broken lock, met while loading tasks: doit's "ERROR:" with phibuild's message."""
    try:
        yield
    except PhibuildError as exc:
        raise InvalidTask(f"phibuild: {exc}") from None


def _loaded(root: Path | None = None) -> tuple[Project, list[Target], list[str]]:
    """The project and its targets."""
    with _settings_errors():
        proj = project(root)
        found, skipped = proj.targets()
    return proj, found, skipped


def quantize_tasks(root: Path | None = None) -> Iterator[dict]:
    """Yield the task dictionaries of every buildable target of the project at ``root``."""
    proj, found, skipped = _loaded(root)
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
            "targets": [str(proj.visible(target.name))],
            "clean": [(clean, [root_text, target.name])],
            "verbosity": 2,
        }


def _doc(target: Target) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(target.params.items()))
    source = target.model.repo or ("embedded" if target.model.embedded else str(target.model.path))
    return f"{target.model.name} ({source}) -> {target.backend.title} {target.precision} [{params}]"


def task_quantize() -> Iterator[dict]:
    """Quantize Phi models into content-addressed, locked artifacts."""
    yield from quantize_tasks()


def task_verify() -> dict:
    """Check every artifact in artifacts.lock against the store and build/, reading every byte."""
    proj, _, _ = _loaded()
    return {"actions": [(_verify, [str(proj.root)])], "verbosity": 2}


@_action
def _verify(root: str) -> TaskFailed | None:
    proj = project(Path(root))
    problems = verify.verify(proj)
    for problem in problems:
        print(f"phibuild: verify: {problem}")
    if problems:
        return TaskFailed(f"phibuild: verify found {len(problems)} problems")
    print(f"phibuild: verify: all {len(proj.lock.read())} artifacts match artifacts.lock")
    return None


def task_reproduce() -> Iterator[dict]:
    """Rebuild locked artifacts from scratch, bypassing every cache, and compare their bytes with the lock."""
    proj, found, _ = _loaded()
    with _settings_errors():
        locked = proj.lock.read()
    for target in found:
        if target.name in locked:
            yield {"name": target.name, "doc": f"rebuild {target.name} and compare it with artifacts.lock",
                   "actions": [(_reproduce, [str(proj.root), target.name])], "verbosity": 2}


@_action
def _reproduce(root: str, name: str) -> TaskFailed | None:
    proj = project(Path(root))
    problems = verify.reproduce(proj, proj.target(name))
    if problems:
        print(f"phibuild: {name}: NOT reproducible: " + "; ".join(problems), flush=True)
        return TaskFailed(f"phibuild: {name} is not bit-reproducible")
    print(f"phibuild: {name}: reproducible (every file identical to artifacts.lock)", flush=True)
    return None


def task_release() -> dict:
    """Gather artifacts into the release directory with a model card each and SHA256SUMS."""
    proj, _, _ = _loaded()
    return {"actions": [(_release, [str(proj.root)])], "verbosity": 2}


@_action
def _release(root: str) -> None:
    proj = project(Path(root))
    names = proj.config.release if proj.config.release is not None else sorted(proj.lock.read())
    directory = proj.root / proj.config.release_dir
    lines = release.release(proj, names, directory)
    print(f"phibuild: released {len(names)} artifacts ({len(lines)} files) in {directory}; "
          f"check them with: cd {directory} && sha256sum -c SHA256SUMS", flush=True)


def task_gc() -> dict:
    """List store entries artifacts.lock does not reference (`doit gc --delete` removes them)."""
    proj, _, _ = _loaded()
    return {"actions": [(_gc, [str(proj.root)])], "verbosity": 2,
            "params": [{"name": "delete", "long": "delete", "type": bool, "default": False,
                        "help": "remove the unreferenced entries (default: only list them)"}]}


@_action
def _gc(root: str, delete: bool) -> None:
    proj = project(Path(root))
    locked = proj.lock.read().values()
    referenced = {entry["key"] for entry in locked} | {e["intermediate"] for e in locked if "intermediate" in e}
    garbage = proj.store.garbage(referenced)
    for entry, size in garbage:
        print(f"phibuild: gc: {'removing' if delete else 'would remove'} {entry.key} "
              f"({entry.manifest.get('target', '?')}, {size / 2**20:.1f} MiB)")
        if delete:
            proj.store.remove(entry.key)
    total = sum(size for _, size in garbage) / 2**20
    verb = "removed" if delete else "can be removed (doit gc --delete)"
    print(f"phibuild: gc: {len(garbage)} unreferenced entries, {total:.1f} MiB {verb}", flush=True)


def task_assemble() -> dict:
    """Write artifacts.lock from the locks of CI jobs that each built a slice of the targets."""
    proj, _, _ = _loaded()
    return {"actions": [(_assemble, [str(proj.root)])], "verbosity": 2,
            "params": [{"name": "slices", "long": "slices", "type": str, "default": "slices/*.lock",
                        "help": "glob of the slice lock files, relative to the project"}]}


@_action
def _assemble(root: str, slices: str) -> TaskFailed | None:
    proj = project(Path(root))
    paths = sorted(proj.root.glob(slices))
    if not paths:
        return TaskFailed(f"phibuild: no slice lock files match {slices!r} in {proj.root}")
    taken = proj.assemble(paths)
    print(f"phibuild: assembled artifacts.lock from {len(paths)} slices; "
          f"{len(taken)} entries taken from them: {', '.join(taken) or 'none'}", flush=True)
    return None


def run(root: Path, *args: str) -> int:
    """``doit ARGS`` for the project at ``root`` in this process, as a fresh ``doit`` would run it there,
    without Python's start-up: what tests and benchmarks use to see what one run does and reads."""
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    forget_projects()
    with contextlib.chdir(root):
        namespace = {name: value for name, value in globals().items() if name.startswith("task_")}
        namespace["DOIT_CONFIG"] = dodo_config(root)
        # doit's reporter defaults to the sys.stdout of its import; give it the current one.
        main = DoitMain(ModuleTaskLoader(namespace), extra_config={"run": {"outfile": sys.stdout}})
        return main.run(list(args)) or 0  # as the process exit status: `doit clean` returns None


DOIT_CONFIG = {"subtasks": True}  # `doit list` shows every target, not just the group


def dodo_config(root: Path | None = None) -> dict:
    """DOIT_CONFIG for a project: its ``default`` targets become doit's default tasks (without
    any, plain ``doit`` builds every target; verify, release and the rest run only when named).

    A broken ``[tool.phibuild]`` is reported when doit loads the tasks (as "ERROR: ..."), not here,
    where an exception would reach the user as a traceback.
    """
    try:
        defaults = project(root).config.default
    except PhibuildError:
        defaults = []
    return {**DOIT_CONFIG, "default_tasks": [f"quantize:{name}" for name in defaults] or ["quantize"]}
