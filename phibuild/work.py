"""What a toolchain's interpreter runs (``toolchains.worker``): the steps of one job, read from job.json, their
results written to result.json. It imports the backends' execution code, which imports the toolchain, and of
phibuild only modules that need nothing but the standard library: never doit's side.

Each step is ``{"verb": ..., "failure": "<what failed, for the message>", ...}``; the verbs are ``VERBS``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import measuring
from .backends import Job, get
from .errors import PhibuildError, causes, file_system_error
from .toolchains.declare import python_tag

log = logging.getLogger(__name__)


def build(step: dict[str, Any]) -> None:
    """The backend's build into the empty directory ``job.output``; the model's own code is kept out of the
    artifact unless the model opted in to it."""
    job = Job.from_dict(step["job"])
    get(step["backend"]).build(job)
    if not job.trust_remote_code:
        drop_remote_code(job.output)


def build_intermediate(step: dict[str, Any]) -> None:
    get(step["backend"]).build_intermediate(Job.from_dict(step["job"]))


def smoke(step: dict[str, Any]) -> str:
    """The smoke check's one line."""
    return get(step["backend"]).smoke(Path(step["artifact"]), Job.from_dict(step["job"])).summary()


def facts(step: dict[str, Any]) -> dict[str, str]:
    return get(step["backend"]).facts()


def reference(step: dict[str, Any]) -> None:
    measuring.reference(step["source"], step["trust_remote_code"], step["text"], step["windows"], step["length"],
                        step["vision"], Path(step["output"]))


def measure(step: dict[str, Any]) -> None:
    measuring.measure(step["backend"], Path(step["artifact"]), Job.from_dict(step["job"]), Path(step["reference"]),
                      Path(step["output"]))


def inventory(step: dict[str, Any]) -> dict[str, Any]:
    """The interpreter (as keys record it) and every distribution installed in this environment, by PEP 503
    name, with its version."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_canonical(name), dist.version)
    return {"python": python_tag(), "packages": dict(sorted(found.items()))}


VERBS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "build": build, "build_intermediate": build_intermediate, "smoke": smoke, "facts": facts,
    "reference": reference, "measure": measure, "inventory": inventory,
}


def drop_remote_code(output: Path) -> None:
    """Remove ``*.py`` files and ``auto_map`` entries (which tell transformers to import them) from an
    artifact: a model that did not opt in to remote code ships none."""
    for path in sorted(output.rglob("*.py")):
        path.unlink()
    for path in sorted(output.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            del data["auto_map"]
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def main(job: str) -> int:
    """Run the job in directory ``job``; its result (or its one error) goes to result.json. Exit 0 either way:
    a worker that exits otherwise, or is killed, failed outside any step."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    directory = Path(job)
    steps = json.loads((directory / "job.json").read_text())["steps"]
    results, failure = [], ""
    try:
        for step in steps:
            failure = step.get("failure", step["verb"])
            results.append(VERBS[step["verb"]](step))
        outcome: dict[str, Any] = {"results": results}
    except Exception as exc:  # said in one line, beside what the toolchain printed
        outcome = {"error": error(exc, failure)}
    sys.stdout.flush()
    sys.stderr.flush()
    (directory / "result.json").write_text(json.dumps(outcome))
    return 0


def error(exc: Exception, failure: str) -> dict[str, str]:
    """A step's exception as doit's side raises it again: phibuild's own errors as they are, an operating
    system error in its one line, anything else as a BuildError starting with ``failure``."""
    if isinstance(exc, PhibuildError):
        return {"kind": type(exc).__name__, "message": str(exc)}
    cause = next((e for e in causes(exc) if isinstance(e, OSError)), None)
    if cause is not None:
        return {"kind": "FileSystemError", "message": str(file_system_error(cause, failure))}
    return {"kind": "BuildError", "message": f"{failure}: {type(exc).__name__}: {exc}"}


def _canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()
