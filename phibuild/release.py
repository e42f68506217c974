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

from . import fidelity, reading, report, validate
from .card import model_card
from .errors import BuildError, DamageError, LockError
from .hashing import FileDigest, hash_file
from .project import Project
from .records import LockEntry
from .store import Entry, files_under, staged

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
        strangers = [name for name in project.config.release if name not in configured]
        if strangers:
            raise BuildError(f"[tool.phibuild] release names {', '.join(strangers)}, which this project does not "
                             "build (`doit list` shows its targets)")
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
    """Gather the chosen artifacts into ``directory``; nothing is replaced unless every one of them is shippable."""
    chosen = choose(project)
    if not chosen.artifacts:
        raise BuildError(f"nothing to release: none of the {len(chosen.not_built)} configured artifacts is built here "
                         f"(`doit quantize:NAME` builds or restores one); {project.shown(directory)} is left as it is")
    lock = project.lock.read().artifacts
    figures_checked = {name: shippable(project, name, lock[name]) for name in chosen.artifacts}
    with staged(directory, _not_released) as staging:
        sums: dict[str, str] = {}  # path in the bundle -> sha256
        for name in sorted(chosen.artifacts):
            entry = lock[name]
            try:
                stored = project.store.get(entry.key)
            except DamageError as exc:
                project.store.remove(entry.key)
                raise BuildError(f"{name}: the store entry was damaged ({exc}) and is removed; `doit quantize:{name}` "
                                 "builds or restores it again") from None
            for file, want in sorted(entry.files.items()):
                copy = validate.inside(staging, f"{name}/{file}")
                copy.parent.mkdir(parents=True, exist_ok=True)
                try:
                    got = hash_file(stored.artifact / file, with_sha256=True, copy_to=copy)
                except FileNotFoundError:
                    got = None
                if got != want:
                    _refuse(project, name, stored, file, got, want)
                sums[f"{name}/{file}"] = got.sha256
            card = staging / name / CARD
            card.write_text(model_card(name, entry, figures_checked[name]))
            sums[f"{name}/{CARD}"] = hashlib.sha256(card.read_bytes()).hexdigest()
        (staging / REPORT).mkdir()
        report.render(project, report.rows(project, chosen.artifacts), staging / REPORT)
        for file in sorted((staging / REPORT).iterdir()):
            sums[f"{REPORT}/{file.name}"] = hashlib.sha256(file.read_bytes()).hexdigest()
        chosen.sums = [f"{digest}  {path}" for path, digest in sorted(sums.items())]
        (staging / "SHA256SUMS").write_text("\n".join(chosen.sums) + "\n")
    return chosen


def shippable(project: Project, name: str, entry: LockEntry) -> bool:
    """Refuse an artifact nobody vouched for (pulled for a key the lock did not pin, unsigned, not rebuilt here),
    and one whose fidelity figures in the lock disagree with the measurement they name: release and publish ship
    neither. Returns whether the figures were checked against their measurement here (the card says when not)."""
    if entry.smoke.unverified:
        raise BuildError(f"{name} was pulled from {entry.smoke.pulled_from} for a key artifacts.lock did not pin, "
                         f"without a trusted signature, so it is not shipped: `doit reproduce:{name}` rebuilds it here "
                         "and vouches for it when the bytes agree (or list the writer's key in trusted_keys)")
    return entry.fidelity is None or entry.fidelity.not_run is not None or fidelity.checked(project, name,
                                                                                            entry.fidelity)


def _refuse(project: Project, name: str, stored: Entry, file: str, got: FileDigest | None, want: FileDigest) -> None:
    """A store file that is not the one the lock pins: if the entry no longer matches its own manifest it is
    damaged, and removed so that ``doit quantize`` rebuilds it; if it does, only a build can tell whether the lock
    or the entry is wrong, and nothing is removed."""
    if project.store.damaged_files(stored, read=True):
        project.store.remove(stored.key)
        raise BuildError(f"{name}: {file} in the store is damaged (it no longer matches its manifest); the entry is "
                         f"removed: `doit quantize:{name}` builds or restores it again")
    have = "missing" if got is None else f"{got.size} bytes, sha256 {got.sha256[:16]}"
    raise LockError(f"{name}: artifacts.lock pins {file} as {want.size} bytes, sha256 {want.sha256[:16]}, but the "
                    f"store's entry, which matches its own manifest, holds {have}: either the lock was edited or the "
                    f"entry was forged. `doit quantize:{name}` builds it again and tells which; nothing was removed")


def _not_released(directory: Path) -> set[str]:
    """What a release directory holds beyond a bundle phibuild wrote: SHA256SUMS listing only artifacts' files
    (``<target>/<file>``, each artifact with its card) and the report's, and nothing beside what it lists. A
    directory of someone else's with a SHA256SUMS of its own (``sha256sum * > SHA256SUMS``) is no bundle."""
    files = files_under(directory)
    try:
        listed = {line.partition("  ")[2] for line in reading.read_text(directory / "SHA256SUMS",
                                                                         "release sums").splitlines()}
    except (OSError, reading.Unreadable):
        return files
    bundle = all(path.count("/") >= 1 and (path.startswith(f"{REPORT}/") or validate.NAME.match(path.split("/")[0]))
                 for path in listed)
    cards = {path.split("/")[0] for path in listed if not path.startswith(f"{REPORT}/")}
    if not bundle or not all(f"{name}/{CARD}" in listed for name in cards):
        return files
    return files - listed - {"SHA256SUMS"}
