"""doit tasks, as plain task dictionaries: one ``quantize:<model>-<precision>-<backend>`` per target, one
``fidelity:<target>`` measuring it against its source (after quantizing it), ``report`` showing what was
measured, and ``verify``, ``reproduce:<target>``, ``release``, ``gc``, ``assemble`` over what artifacts.lock pins, and
``toolchains``, which makes the toolchains' environments ahead of time.

Use from a ``dodo.py``::

    from phibuild.tasks import (  # noqa: F401
        dodo_config, task_assemble, task_fidelity, task_gc, task_publish, task_quantize, task_release,
        task_report, task_reproduce, task_toolchains, task_verify,
    )

    DOIT_CONFIG = dodo_config()

Freshness is decided by phibuild's cache key (see status.py), through an ``uptodate`` object whose text is
the reason a task is stale, which is what ``doit info quantize:<name>`` prints. doit's own MD5 file checks
are not used: weights are never hashed by doit. This is the layer that talks to the person running doit:
the library logs, and a handler here prints its records as ``phibuild: ...`` lines. phibuild's errors, and
any operating system error, reach the user as one message, never a traceback: bad settings as doit's
"ERROR:", a failed build as a failed task.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from doit import task_params
from doit.exceptions import InvalidTask, TaskFailed

from . import assemble, backends, build, doit_config, fidelity, gc, publish, release, report, status, verify
from .backends import platform_tag
from .errors import PhibuildError, file_system_error
from .lockfile import Lockfile
from .project import LeftOut, Project, Target, frozen, left_out_summary
from .records import Smoke
from .store import files_under, remove_made, sweep
from .toolchains import chosen, declare, environment, lock, worker

log = logging.getLogger("phibuild")
_projects: dict[tuple[int, Path], Project] = {}


class _Console(logging.Handler):
    """phibuild's log records as lines for the person running doit: information on the current stdout,
    warnings and errors on the current stderr (looked up at each record, so that doit's and pytest's
    redirections apply)."""

    def emit(self, record: logging.LogRecord) -> None:
        warning = record.levelno >= logging.WARNING
        stream = sys.stderr if warning else sys.stdout
        stream.write(f"phibuild: {record.levelname.lower() + ': ' if warning else ''}{record.getMessage()}\n")
        stream.flush()


def _console() -> None:
    if not any(isinstance(handler, _Console) for handler in log.handlers):
        log.addHandler(_Console())
        log.setLevel(logging.INFO)
        log.propagate = False


def project(root: Path | None = None) -> Project:
    """This process's Project for ``root`` (doit -n forks workers: each opens its own store handles). The
    first load sweeps up what killed runs left half-made beside build/ directories and the lock."""
    root = (root or Path.cwd()).resolve()
    key = (os.getpid(), root)
    if key not in _projects:
        _console()
        proj = Project.load(root)
        # matplotlib (the report's plots) keeps its cache and settings in the store, not in the home directory
        os.environ.setdefault("MPLCONFIGDIR", str(proj.store.root / "matplotlib"))
        sweep(proj.root / proj.config.build)
        sweep(proj.lock.path.parent)
        _projects[key] = proj
    return _projects[key]


def forget_projects() -> None:
    """Drop this process's Projects, so the next use re-reads ``pyproject.toml`` (for in-process doit runs)."""
    for proj in _projects.values():
        proj.store.statcache.close()
    _projects.clear()


class Fresh:
    """doit ``uptodate`` callable; after a call, ``str(self)`` says why the task is stale. ``check`` is the
    status function: the artifact's (``status.status``) or its fidelity record's (``fidelity.status``)."""

    def __init__(self, root: Path, name: str, check: Callable = status.status):
        self.root, self.name, self.check, self.reason = root, name, check, "not checked yet"

    def __call__(self, task: object, values: dict) -> bool:
        try:
            proj = project(self.root)
            self.reason = self.check(proj, proj.target(self.name)) or "up to date"
        except PhibuildError as exc:
            self.reason = str(exc)
        except OSError as exc:
            self.reason = str(file_system_error(exc, "checking the target"))
        return self.reason == "up to date"

    def __str__(self) -> str:
        return self.reason


def _action(function: Callable) -> Callable:
    """A task action whose errors fail the task with their message alone, never a traceback."""

    @functools.wraps(function)  # doit reads the signature to pass command-line parameters
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except PhibuildError as exc:
            return TaskFailed(f"phibuild: {exc}")
        except OSError as exc:
            return TaskFailed(f"phibuild: {file_system_error(exc)}")

    return run


@_action
def _build(root: str, name: str) -> str:
    """The task action: make one target fresh."""
    proj = project(Path(root))
    message = f"{name}: {build.build(proj, proj.target(name))}"
    log.info("%s", message)
    return message


@_action
def _clean(root: str, name: str) -> None:
    """Remove the visible artifact; the store keeps it, so the next build restores it at once."""
    proj = project(Path(root))
    visible = proj.visible(proj.target(name).name)
    if visible.exists() or visible.is_symlink():
        entry = proj.lock.get(name)
        remove_made(visible, lambda old: files_under(old) - set(entry.files if entry else ()))
        log.info("removed %s (kept in the store)", proj.shown(visible))


@contextlib.contextmanager
def _settings_errors() -> Iterator[None]:
    """Broken settings or a broken lock, met while loading tasks: doit's "ERROR:" with phibuild's message."""
    try:
        yield
    except PhibuildError as exc:
        raise InvalidTask(f"phibuild: {exc}") from None
    except OSError as exc:
        raise InvalidTask(f"phibuild: {file_system_error(exc, 'loading the project')}") from None


def _loaded(root: Path | None = None) -> tuple[Project, list[Target], list[LeftOut]]:
    """The project and its targets."""
    with _settings_errors():
        proj = project(root)
        found, skipped = proj.targets()
    return proj, found, skipped


def quantize_tasks(root: Path | None = None) -> Iterator[dict]:
    """Yield the task dictionaries of every buildable target of the project at ``root``."""
    proj, found, skipped = _loaded(root)
    with _settings_errors():
        _check_environment(proj, found)
    unavailable = proj.unavailable_backends()
    yield {
        "basename": "quantize",
        "name": None,
        "doc": f"Quantize Phi models: {len(found)} targets"
        + (f"; cannot run here: {', '.join(unavailable)}" if unavailable else "")
        + (f"; left out: {left_out_summary(skipped)}" if skipped else ""),
    }
    root_text = str(proj.root)
    with _settings_errors():
        locked = proj.lock.read().artifacts
    for target in found:
        entry = locked.get(target.name)
        yield {
            "basename": "quantize",
            "name": target.name,
            "doc": _doc(target) + (f"; {_provenance(entry.smoke)}" if entry and entry.smoke.pulled_from else ""),
            "actions": [(_build, [root_text, target.name])],
            "uptodate": [Fresh(proj.root, target.name)],
            "targets": [str(proj.visible(target.name))],
            "clean": [(_clean, [root_text, target.name])],
            "verbosity": 2,
        }


def _check_environment(proj: Project, found: list[Target]) -> None:
    """Say once, before any task runs, when this phibuild's toolchain locks are not the ones artifacts.lock was
    built with (and fail in frozen mode): every target of those backends would be stale for that reason alone."""
    backends = {target.backend.name: target.backend for target in found}
    differing: dict[str, set[str]] = {}  # backend -> "name lock-version -> this version"
    for entry in proj.lock.read().artifacts.values():
        backend = backends.get(entry.parts.backend)
        if backend is None or entry.parts.machine.get("platform") != platform_tag():
            continue
        changes = proj.toolchain(backend).differences(entry.parts.toolchain)
        if changes:
            differing.setdefault(backend.name, set()).update(changes)
    if not differing:
        return
    found_text = "; ".join(f"{name}: {', '.join(sorted(changes))}" for name, changes in sorted(differing.items()))
    message = (f"this phibuild's toolchain locks differ from those artifacts.lock was built with ({found_text}): "
               f"every target of {', '.join(sorted(differing))} is stale for that reason alone. Install the "
               "phibuild the lock was built with, or build again and commit the lock")
    if frozen():
        raise PhibuildError(message + "; PHIBUILD_FROZEN is set")
    log.warning("%s", message)


def _provenance(smoke: Smoke) -> str:
    """Where a pinned artifact came from, for ``doit list`` and ``doit info``."""
    if smoke.unverified:
        return f"pulled from {smoke.pulled_from}, UNVERIFIED (not shipped until `doit reproduce` rebuilds it here)"
    return f"pulled from {smoke.pulled_from}, trusted: {smoke.trusted_by}"


def _doc(target: Target) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(target.params.items()))
    source = target.model.repo or ("embedded" if target.model.embedded else str(target.model.path))
    return f"{target.model.name} ({source}) -> {target.backend.title} {target.precision} [{params}]"


def task_quantize() -> Iterator[dict]:
    """Quantize Phi models into content-addressed, locked artifacts."""
    yield from quantize_tasks()


def task_fidelity() -> Iterator[dict]:
    """Measure each artifact against its FP32 source in its own runtime, and gate it."""
    proj, found, _ = _loaded()
    with _settings_errors():
        locked = proj.lock.read().artifacts
    yield {"basename": "fidelity", "name": None,
           "doc": f"Measure {len(found)} artifacts against their FP32 sources (KL, top-1, perplexity) and gate them"}
    for target in found:
        record = locked[target.name].fidelity if target.name in locked else None
        said = record.summary() if record else "not measured yet: KL, top-1 and perplexity"
        yield {"basename": "fidelity", "name": target.name,
               "doc": f"{said} (against {target.model.name} in float32 transformers)",
               "actions": [(_fidelity, [str(proj.root), target.name])],
               "task_dep": [f"quantize:{target.name}"],
               "uptodate": [Fresh(proj.root, target.name, fidelity.status)], "verbosity": 2}


@_action
def _fidelity(root: str, name: str) -> TaskFailed | str:
    proj = project(Path(root))
    target = proj.target(name)
    measured = fidelity.measure(proj, target)
    log.info("%s: fidelity %s (%s)", name, measured.record.summary(), measured.how)
    failed = fidelity.gate(proj, target, measured.record)
    if failed:
        return TaskFailed(f"phibuild: {name} fails its fidelity gate: {failed}")
    return f"{name}: {measured.record.summary()}"


def task_report() -> dict:
    """Write the project's report from artifacts.lock: a table of every artifact, size against KL, KL by position."""
    proj, _, _ = _loaded()
    return {"doc": f"Write {proj.shown(proj.root / proj.config.report_dir / report.PAGE)}: size, KL, top-1 and "
                   "speed of every artifact, with plots, from artifacts.lock (`doit fidelity report` measures first)",
            "actions": [(_report, [str(proj.root)])], "verbosity": 2}


@_action
def _report(root: str) -> None:
    proj = project(Path(root))
    directory = proj.root / proj.config.report_dir
    found = report.write(proj, directory)
    measured = sum(1 for row in found if row.measured)
    reported = {row.name for row in found}
    _not_built("report", [target.name for target in proj.targets()[0] if target.name not in reported])
    log.info("report: %d artifacts, %d measured, in %s", len(found), measured,
             proj.shown(directory / report.PAGE))


def task_verify() -> dict:
    """Check the configured artifacts in artifacts.lock against the store and build/, reading every byte."""
    proj, _, _ = _loaded()
    return {"actions": [(_verify, [str(proj.root)])], "verbosity": 2}


@_action
def _verify(root: str) -> TaskFailed | None:
    proj = project(Path(root))
    report = verify.verify(proj)
    for problem in report.problems:
        log.info("verify: %s", problem)
    _not_built("verify", report.not_built + report.not_locked)
    if report.problems:
        return TaskFailed(f"phibuild: verify found {len(report.problems)} problems")
    log.info("verify: all %d artifacts built here match artifacts.lock", len(report.checked))
    return None


def _not_built(command: str, names: list[str]) -> None:
    """One line for the configured targets that have nothing to check or release on this machine."""
    if names:
        shown = ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        log.info("%s: %d configured targets are not built here (%s): `doit quantize` builds them", command,
                 len(names), shown)


LOCK_OPTION = {"name": "lock", "long": "lock", "type": str, "default": "",
               "help": "compare with this lock file (another machine's) instead of the project's"}


@task_params([LOCK_OPTION])  # `doit reproduce --lock F` as well as `doit reproduce:NAME --lock F`
def task_reproduce(lock: str) -> Iterator[dict]:
    """Rebuild locked artifacts from scratch, bypassing every cache, and compare their bytes with a lock."""
    proj, found, _ = _loaded()
    with _settings_errors():
        locked = proj.lock.read().artifacts
    for target in found:
        yield {"name": target.name, "doc": f"rebuild {target.name} and compare it with artifacts.lock (or --lock)",
               "actions": [(_reproduce, [str(proj.root), target.name])], "verbosity": 2,
               "params": [{**LOCK_OPTION, "default": lock}],
               **({} if target.name in locked else {"uptodate": [False]})}


@_action
def _reproduce(root: str, name: str, lock: str) -> TaskFailed | None:
    proj = project(Path(root))
    against = Lockfile(proj.root / lock) if lock else proj.lock
    if lock and not against.path.is_file():
        return TaskFailed(f"phibuild: --lock {lock}: no such lock file")
    entry = against.get(name)
    if entry is None:
        return TaskFailed(f"phibuild: {name} is not in {lock or 'artifacts.lock'}: there is nothing to compare it "
                          "with" + ("" if lock else f"; `doit quantize:{name}` builds and pins it"))
    problems = verify.reproduce(proj, proj.target(name), entry)
    if problems:
        log.info("%s: NOT reproducible: %s", name, "; ".join(problems))
        return TaskFailed(f"phibuild: {name} is not bit-reproducible")
    log.info("%s: reproducible (every file identical to %s)", name, lock or "artifacts.lock")
    if not lock and entry.smoke.unverified:
        verify.vouch(proj, proj.target(name), entry)
    return None


def task_release() -> dict:
    """Gather the built artifacts into the release directory with a model card each and SHA256SUMS."""
    proj, _, _ = _loaded()
    return {"actions": [(_release, [str(proj.root)])], "verbosity": 2}


@_action
def _release(root: str) -> None:
    proj = project(Path(root))
    directory = proj.root / proj.config.release_dir
    done = release.release(proj, directory)
    _not_built("release", done.not_built)
    log.info("released %d artifacts (%d files) in %s; check them with: cd %s && sha256sum -c SHA256SUMS",
             len(done.artifacts), len(done.sums), proj.shown(directory), proj.shown(directory))


def task_publish() -> dict:
    """Push the released artifacts to Hugging Face repositories, one commit each (skipped when already there)."""
    proj, _, _ = _loaded()
    # without its settings it says so at once, rather than after a release it cannot use
    return {"actions": [(_publish, [str(proj.root)])], "task_dep": ["release"] if proj.config.publish else [],
            "verbosity": 2}


@_action
def _publish(root: str) -> None:
    proj = project(Path(root))
    done = publish.publish(proj, proj.root / proj.config.release_dir)
    committed = sum(1 for item in done if item.commit)
    log.info("publish: %d artifacts committed, %d already published", committed, len(done) - committed)


def task_gc() -> dict:
    """List store entries artifacts.lock does not reference, and toolchain environments this phibuild's locks do
    not name (`doit gc --delete` removes them)."""
    proj, _, _ = _loaded()
    return {"actions": [(_gc, [str(proj.root)])], "verbosity": 2,
            "params": [{"name": "delete", "long": "delete", "type": bool, "default": False,
                        "help": "remove the unreferenced entries (default: only list them)"}]}


@_action
def _gc(root: str, delete: bool) -> None:
    proj = project(Path(root))
    found = gc.garbage(proj)
    for item in found:
        log.info("gc: %s %s (%s, %.1f MiB)", "removing" if delete else "would remove", item.directory.name,
                 item.label, item.size / 2**20)
        if delete:
            gc.remove(proj, item)
    total = sum(item.size for item in found) / 2**20
    verb = "removed" if delete else "can be removed (doit gc --delete)"
    log.info("gc: %d unreferenced entries, %.1f MiB %s", len(found), total, verb)
    current = set()
    for name in declare.NAMES:
        with contextlib.suppress(PhibuildError):  # a toolchain without a lock here has no environment to keep
            current.add(declare.locked(name).environment_name)
    for place in [*environment.made(), *environment.leftovers()]:
        if place.name not in current:
            log.info("gc: %s toolchain environment %s (%s)", "removing" if delete else "would remove", place,
                     environment.size(place))
            if delete:
                environment.remove(place)


def task_assemble() -> dict:
    """Write artifacts.lock from the locks of CI jobs that each built a slice of the targets."""
    proj, _, _ = _loaded()
    return {"actions": [(_assemble, [str(proj.root)])], "verbosity": 2,
            "params": [{"name": "slices", "long": "slices", "type": str, "default": "slices/*.lock",
                        "help": "glob of the slice lock files, relative to the project"}]}


@_action
def _assemble(root: str, slices: str) -> TaskFailed | None:
    proj = project(Path(root))
    try:
        paths = sorted(proj.root.glob(slices))
    except (ValueError, NotImplementedError) as exc:  # an empty or absolute pattern
        return TaskFailed(f"phibuild: --slices {slices!r} is not a glob relative to the project: {exc}")
    if not paths:
        return TaskFailed(f"phibuild: no slice lock files match {slices!r} in {proj.root}")
    taken = assemble.assemble(proj, paths)
    log.info("assembled artifacts.lock from %d slices; %d entries taken from them: %s", len(paths), len(taken),
             ", ".join(taken) or "none")
    return None


def task_toolchains() -> dict:
    """Make and check the environments of the toolchains the project uses, ahead of time (CI caches, offline
    machines); `--upgrade NAME` resolves that toolchain's locks again from its declaration."""
    proj, _, _ = _loaded()
    return {"actions": [(_toolchains, [str(proj.root)])], "verbosity": 2,
            "params": [{"name": "upgrade", "long": "upgrade", "type": str, "default": "",
                        "help": "a toolchain whose locks to resolve again, at the newest versions its "
                                "requirements.in allows (" + ", ".join(declare.NAMES) + ")"}]}


@_action
def _toolchains(root: str, upgrade: str) -> TaskFailed | None:
    proj = project(Path(root))
    if upgrade:
        if upgrade not in declare.NAMES:
            return TaskFailed(f"phibuild: --upgrade {upgrade!r}: phibuild has the toolchains "
                              f"{', '.join(declare.NAMES)}")
        written = lock.upgrade(upgrade)
        return None if written else TaskFailed(f"phibuild: no lock of {upgrade} could be resolved")
    names = sorted({backends.get(name).toolchain for name in proj.config.backends} | {fidelity.TOOLCHAIN})
    for name in names:
        locked = declare.locked(name)
        place = environment.ensure(locked)
        installed = chosen.inventory(functools.partial(worker.call, environment.python(place)),
                                     f"the {name} toolchain in {place}")["packages"]
        extra = sorted(set(installed) - set(locked.packages) - {"pip"})
        changed = sorted(name for name, version in locked.packages.items() if installed.get(name) != version)
        if extra or changed:
            return TaskFailed(f"phibuild: the {name} toolchain in {place} is not what its lock says (changed: "
                              f"{', '.join(changed) or 'none'}; not in the lock: {', '.join(extra) or 'none'}): "
                              f"remove it (rm -r {place}) and run doit toolchains again")
        log.info("toolchain %s: %s, %d packages as locked, %s", name, place, len(locked.packages),
                 environment.size(place))
    return None


def run(root: Path, *args: str) -> int:
    """``doit ARGS`` for the project at ``root`` in this process, as a fresh ``doit`` would run it there,
    without Python's start-up: what tests and benchmarks use to see what one run does and reads."""
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    forget_projects()
    if "" in args:  # doit's own parser fails on one (see doit_config.py)
        sys.stderr.write(f"ERROR: {doit_config.EMPTY_ARGUMENT}\n")
        return 3
    with contextlib.chdir(root):
        namespace = {name: value for name, value in globals().items() if name.startswith("task_")}
        namespace["DOIT_CONFIG"] = dodo_config(root)
        # doit's reporter defaults to the sys.stdout of its import; give it the current one.
        try:
            main = DoitMain(ModuleTaskLoader(namespace), extra_config={"run": {"outfile": sys.stdout}})
        except Exception as exc:  # doit reads pyproject.toml's [tool.doit] here, before anything of ours runs
            sys.stderr.write(f"ERROR: {root / 'pyproject.toml'} {doit_config.said(type(exc), exc)}\n")
            return 3
        return main.run(list(args)) or 0  # as the process exit status: `doit clean` returns None


DOIT_CONFIG = {"subtasks": True}  # `doit list` shows every target, not just the group


def dodo_config(root: Path | None = None) -> dict:
    """DOIT_CONFIG for a project: its ``default`` targets become doit's default tasks (without any, plain ``doit``
    builds every target of the embedded and local models, which need no download; verify, release and the
    rest run only when named).

    A broken ``[tool.phibuild]`` is reported when doit loads the tasks (as "ERROR: ..."), not here,
    where an exception would reach the user as a traceback.
    """
    try:
        proj = project(root)
        defaults = proj.config.default or [target.name for target in proj.targets()[0] if not target.model.repo]
    except (PhibuildError, OSError):
        defaults = []
    return {**DOIT_CONFIG, "default_tasks": [f"quantize:{name}" for name in defaults] or ["quantize"]}
