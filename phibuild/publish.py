"""``doit publish``: each released artifact to a Hugging Face repository of its own, in one commit.

The repository is named by ``[tool.phibuild.publish] repo`` (a pattern over ``{target}``, ``{model}``,
``{precision}`` and ``{backend}``); the token is huggingface_hub's (``HF_TOKEN``), the hub ``HF_ENDPOINT``'s.
What is published is what ``doit release`` wrote, checked against its ``SHA256SUMS`` and then against
``artifacts.lock`` (files, sha256, the card its entry gives; nobody vouched for, not shipped); the model card
becomes the repository's ``README.md``. An artifact the repository already holds, file for file (LFS files by
sha256, the others by their git blob id), is skipped: publishing twice makes no second commit. Otherwise one
commit adds every file and removes files the artifact no longer has, so a reader sees the old artifact or the
new one, never a mix.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from . import reading
from .card import model_card
from .errors import BuildError, ConfigError
from .project import Project
from .records import LockEntry
from .release import CARD, REPORT, shippable

log = logging.getLogger(__name__)
KEPT = {".gitattributes"}  # the hub's own, in every repository


@dataclass(frozen=True)
class Published:
    target: str
    repo: str
    commit: str | None  # None: the repository already held exactly these files


def publish(project: Project, release_dir: Path) -> list[Published]:
    """Push each artifact of ``release_dir`` (checked against its SHA256SUMS) to its repository, one commit each."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    settings = project.config.publish
    if not settings:
        raise ConfigError('doit publish needs [tool.phibuild.publish] repo = "you/{target}" in pyproject.toml')
    sums = _checked_release(release_dir)
    lock = project.lock.read().artifacts
    targets = sorted({path.split("/", 1)[0] for path in sums} - {REPORT})  # the report is the bundle's
    for target in targets:  # every artifact checked before the first is pushed
        entry = lock.get(target)
        if entry is None:
            raise BuildError(f"{release_dir / target} is not in artifacts.lock; run `doit release` again")
        _as_locked(project, release_dir, target, entry, sums)
    api = HfApi()
    done = []
    for target in targets:
        entry = lock[target]
        repo = repo_name(settings["repo"], target, entry.model, entry.parts.precision, entry.parts.backend)
        files = {("README.md" if path == f"{target}/{CARD}" else path.split("/", 1)[1]): path
                 for path in sums if path.startswith(f"{target}/")}
        try:
            api.create_repo(repo, private=settings.get("private", False), exist_ok=True)
            existing = _remote_files(api, repo)
            if existing.keys() - KEPT == files.keys() and all(
                    existing[name] in (sums[path], _blob_id(release_dir / path)) for name, path in files.items()):
                log.info("publish: %s: %s already holds these files; nothing to commit", target, repo)
                done.append(Published(target, repo, None))
                continue
            operations = [CommitOperationAdd(name, str(release_dir / path)) for name, path in sorted(files.items())]
            operations += [CommitOperationDelete(name) for name in sorted(existing.keys() - files.keys() - KEPT)]
            info = api.create_commit(repo, operations, commit_message=f"{target}: phibuild artifact {entry.key}")
        except Exception as exc:  # huggingface_hub raises many kinds; each means this artifact is not published
            raise BuildError(f"publishing {target} to {repo} failed: {type(exc).__name__}: {exc}") from None
        log.info("publish: %s: committed to %s (%s)", target, repo, info.oid[:12])
        done.append(Published(target, repo, info.oid))
    return done


def repo_name(pattern: str, target: str, model: str, precision: str, backend: str) -> str:
    from .config import REPO

    try:
        name = pattern.format(target=target, model=model, precision=precision, backend=backend)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"[tool.phibuild.publish] repo = {pattern!r}: {exc}; it may use {{target}}, {{model}}, "
                          "{precision} and {backend}") from None
    if not REPO.match(name):
        raise ConfigError(f"[tool.phibuild.publish] repo = {pattern!r} gives {name!r}, not a repository id "
                          "like \"you/phi35-int4-onnx\"")
    return name


def _as_locked(project: Project, release_dir: Path, target: str, entry: LockEntry, sums: dict[str, str]) -> None:
    """What publish pushes of ``target`` is what artifacts.lock pins: its files, each with the lock's sha256 (not
    only SHA256SUMS', which whoever swapped a file could rewrite too), and the card the lock's entry gives."""
    figures_checked = shippable(project, target, entry)
    again = "; run `doit release` again"
    have = {path.split("/", 1)[1] for path in sums if path.startswith(f"{target}/")}
    if have != set(entry.files) | {CARD}:
        differ = sorted(have ^ (set(entry.files) | {CARD}))
        raise BuildError(f"{release_dir / target} does not hold the files artifacts.lock pins ({', '.join(differ)})"
                         + again)
    for file, want in entry.files.items():
        if sums[f"{target}/{file}"] != want.sha256:
            raise BuildError(f"{release_dir / target / file} is not the file artifacts.lock pins" + again)
    if (release_dir / target / CARD).read_text() != model_card(target, entry, figures_checked):
        raise BuildError(f"{release_dir / target / CARD} is not the card artifacts.lock's entry gives" + again)


def _checked_release(release_dir: Path) -> dict[str, str]:
    """``{path: sha256}`` from the release's SHA256SUMS, every file read and checked against it."""
    from .hashing import hash_file
    from .validate import Invalid, relative_path

    sums_file = release_dir / "SHA256SUMS"
    if not sums_file.is_file():
        raise BuildError(f"{release_dir} holds no release; run `doit release` first")
    try:
        lines = reading.read_text(sums_file, "release sums").splitlines()
    except reading.Unreadable as exc:
        raise BuildError(str(exc)) from None
    sums = {}
    for line in lines:
        digest, _, path = line.partition("  ")
        try:
            relative_path(path, "SHA256SUMS")
        except Invalid as exc:
            raise BuildError(f"{sums_file}: {exc}") from None
        got = hash_file(release_dir / path, with_sha256=True)
        if got.sha256 != digest:
            raise BuildError(f"{release_dir / path} differs from its SHA256SUMS line; run `doit release` again")
        sums[path] = digest
    return sums


def _remote_files(api, repo: str) -> dict[str, str]:
    """Each file of the repository's main branch, by its sha256 (LFS) or its git blob id."""
    info = api.model_info(repo, files_metadata=True)
    return {s.rfilename: (s.lfs.sha256 if s.lfs else s.blob_id) for s in info.siblings or []}


def _blob_id(path: Path) -> str:
    """The file's git blob id, as the hub knows a file stored in git rather than LFS (read in chunks)."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
