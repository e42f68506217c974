"""Release bundles: chosen artifacts in one directory, a model card each, the report of their fidelity, size and
speed (report.py, in ``report/``), and a SHA256SUMS over all of it.

Anyone can check a bundle with ``sha256sum -c SHA256SUMS`` and compare its sums with ``artifacts.lock``. Every
file is copied out of the store (never linked: what someone edits in a release must not reach the store) and
hashed as it is copied; a file whose sha256 is not the lock's stops the release. The bundle is assembled
beside the old one and swapped in by rename, like the visible artifacts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from . import report, validate
from .card import model_card
from .errors import BuildError, DamageError
from .hashing import hash_file
from .project import Project
from .records import LockEntry
from .store import staged

CARD = "MODEL_CARD.md"
REPORT = "report"  # the bundle's report directory; no target is called that (names end in -<backend>)


@dataclass
class Released:
    sums: list[str] = field(default_factory=list)  # the lines of SHA256SUMS
    artifacts: list[str] = field(default_factory=list)
    not_built: list[str] = field(default_factory=list)  # configured and locked, but not built here: left out


def choose(project: Project) -> Released:
    """What ``doit release`` gathers: the ``release`` setting, or every configured target built here.
    Named artifacts that are not built here are an error, all of them named at once."""
    lock = project.lock.read().artifacts
    found, _ = project.targets()
    configured = sorted(target.name for target in found)
    chosen = Released()
    if project.config.release is not None:
        missing = [name for name in project.config.release if name not in lock or not _built(project, lock[name])]
        if missing:
            raise BuildError(f"cannot release {len(missing)} artifacts that are not built here: "
                             f"{', '.join(missing)}; build them with: doit "
                             + " ".join(f"quantize:{name}" for name in missing))
        chosen.artifacts = list(project.config.release)
        return chosen
    for name in configured:
        if name in lock and _built(project, lock[name]):
            chosen.artifacts.append(name)
        else:
            chosen.not_built.append(name)
    return chosen


def _built(project: Project, entry: LockEntry) -> bool:
    try:
        return project.store.get(entry.key) is not None
    except DamageError:
        return True  # it is there, damaged: release says so


def release(project: Project, directory: Path) -> Released:
    """Gather the chosen artifacts into ``directory``."""
    chosen = choose(project)
    lock = project.lock.read().artifacts
    with staged(directory) as staging:
        sums: dict[str, str] = {}  # path in the bundle -> sha256
        for name in sorted(chosen.artifacts):
            entry = lock[name]
            try:
                stored = project.store.get(entry.key)
            except DamageError as exc:
                raise BuildError(f"{name}: the store entry is damaged ({exc}); run `doit quantize:{name}`") from None
            for file, want in sorted(entry.files.items()):
                copy = validate.inside(staging, f"{name}/{file}")
                copy.parent.mkdir(parents=True, exist_ok=True)
                try:
                    got = hash_file(stored.artifact / file, with_sha256=True, copy_to=copy)
                except FileNotFoundError:
                    raise BuildError(f"{name}: {file} is missing from the store; run `doit quantize:{name}`") from None
                if got != want:
                    raise BuildError(f"{name}: {file} in the store is not the file artifacts.lock pins (sha256 "
                                     f"{got.sha256[:16]}, locked {want.sha256[:16]}): it is damaged; run "
                                     f"`doit quantize:{name}` to rebuild it")
                sums[f"{name}/{file}"] = got.sha256
            card = staging / name / CARD
            card.write_text(model_card(name, entry))
            sums[f"{name}/{CARD}"] = hashlib.sha256(card.read_bytes()).hexdigest()
        (staging / REPORT).mkdir()
        report.render(project, report.rows(project, chosen.artifacts), staging / REPORT)
        for file in sorted((staging / REPORT).iterdir()):
            sums[f"{REPORT}/{file.name}"] = hashlib.sha256(file.read_bytes()).hexdigest()
        chosen.sums = [f"{digest}  {path}" for path, digest in sorted(sums.items())]
        (staging / "SHA256SUMS").write_text("\n".join(chosen.sums) + "\n")
    return chosen

