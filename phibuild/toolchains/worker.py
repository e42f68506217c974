"""Run a job in a toolchain's interpreter, as a process of its own.

A job is a list of steps (``phibuild.work`` lists the verbs), written as job.json into a scratch directory;
the worker writes result.json there. The worker sees phibuild's package and its toolchain's environment, and
nothing else (``python -I``: no user site, no ``PYTHONPATH``, no current directory). What it prints is kept back
and shown only if the job fails; a job that fails, or a worker killed by a signal, is one BuildError naming the
step, so one crashing toolchain fails one target and the others build.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .. import errors, reading
from ..errors import BuildError
from . import environment
from .declare import Locked

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent.parent  # phibuild's own package, all the worker may import of ours
# Loads phibuild from PACKAGE alone (not the directory above it, which may be a checkout with tests and tools).
BOOTSTRAP = (
    "import importlib.util, sys\n"
    "package, job = sys.argv[1], sys.argv[2]\n"
    "spec = importlib.util.spec_from_file_location('phibuild', package + '/__init__.py',"
    " submodule_search_locations=[package])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules['phibuild'] = module\n"
    "spec.loader.exec_module(module)\n"
    "from phibuild import work\n"
    "sys.exit(work.main(job))\n"
)
ERRORS = {cls.__name__: cls for cls in vars(errors).values()
          if isinstance(cls, type) and issubclass(cls, errors.PhibuildError)}
SHOWN = 256 * 1024  # of a failed job's output


def run(locked: Locked, steps: list[dict[str, Any]], failure: str) -> list[Any]:
    """The results of ``steps``, run in order by one worker of ``locked``'s environment. ``failure`` starts the
    message of any error (``"phi35-tiny-int4-onnx: ONNX Runtime GenAI failed"``)."""
    place = environment.ensure(locked)
    return call(environment.python(place), steps, failure)


def call(interpreter: Path, steps: list[dict[str, Any]], failure: str) -> list[Any]:
    """``run`` with a given interpreter (an environment of the user's own, or one just made)."""
    with tempfile.TemporaryDirectory(prefix="phibuild-job-") as scratch:
        job = Path(scratch)
        (job / "job.json").write_text(json.dumps({"steps": steps}))
        env = {name: value for name, value in os.environ.items()
               if name not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
        with open(job / "output.log", "wb") as output:
            try:
                done = subprocess.run([str(interpreter), "-I", "-c", BOOTSTRAP, str(PACKAGE), str(job)], env=env,
                                      stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
            except OSError as exc:
                raise BuildError(f"{failure}: its worker {interpreter} cannot start: {exc.strerror}") from None
        said = _tail(job / "output.log")
        if done.returncode < 0:
            _show(said)
            raise BuildError(f"{failure}: the worker was killed by {_signal(-done.returncode)}")
        result = _result(job / "result.json", len(steps))
        if result is None:
            _show(said)
            raise BuildError(f"{failure}: the worker exited with status {done.returncode} without a result")
        if "error" in result:
            _show(said)
            kind, message = result["error"]["kind"], result["error"]["message"]
            raise ERRORS.get(kind, BuildError)(message)
        if said:
            log.debug("%s", said)
        return result["results"]


def _result(path: Path, steps: int) -> dict[str, Any] | None:
    """result.json, read bounded and checked: ``{"results": [one per step]}`` or ``{"error": {kind, message}}``."""
    try:
        data = reading.json_data(reading.read_bytes(path, "worker result"), str(path))
    except FileNotFoundError:
        return None
    except (OSError, reading.Unreadable) as exc:
        raise BuildError(f"the worker's result {path} cannot be read ({exc})") from None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("kind"), str) and isinstance(error.get("message"), str):
        return {"error": {"kind": error["kind"], "message": error["message"][:4000]}}
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or len(results) != steps:
        raise BuildError(f"the worker's result {path} is not one result per step")
    return {"results": results}


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - SHOWN))
        return handle.read().decode(errors="replace").strip()


def _show(said: str) -> None:
    if said:
        log.error("%s", said)


def _signal(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"

