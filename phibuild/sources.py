"""Where a model's files come from, what they digest to, and whether they are a usable checkpoint.

A local or embedded model is a directory. A hub model is downloaded with ``huggingface_hub`` at one
commit: the first build resolves the requested revision to a commit, the lock pins it, and later builds
download exactly that commit. Downloads resume and show progress (huggingface_hub's own), and every LFS
file is checked against the sha256 the hub publishes for it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import validate
from .catalog import CODE_PATTERNS, SOURCE_PATTERNS, ModelSpec
from .errors import SourceError, file_system_error
from .hashing import StatCache, digest_tree


@dataclass(frozen=True)
class Source:
    """A model's files on disk, pinned by content."""

    directory: Path
    files: dict[str, str]  # relative posix path -> xxh3-128
    revision: str | None = None  # hub commit, None for local models
    license: str | None = None  # as the model card says (the hub's card data, or a local README.md's)

    @property
    def digest(self) -> str:
        return digest_tree(self.files)


def source_files(directory: Path, trust_remote_code: bool = False) -> list[Path]:
    """The files in ``directory`` that a build reads (see ``SOURCE_PATTERNS``; the model's own ``*.py`` only
    with ``trust_remote_code``), sorted."""
    patterns = SOURCE_PATTERNS + (CODE_PATTERNS if trust_remote_code else ())
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                found.append(Path(root) / name)
    return sorted(found)


def digest_directory(directory: Path, cache: StatCache, trust_remote_code: bool = False) -> dict[str, str]:
    """``{relative path: xxh3}`` for a model directory, through the stat cache."""
    if not directory.is_dir():
        raise SourceError(f"model directory {directory} does not exist")
    files = {}
    for path in source_files(directory, trust_remote_code):
        try:
            files[path.relative_to(directory).as_posix()] = cache.digest(path).xxh3_128
        except OSError as exc:
            raise SourceError(str(file_system_error(exc, "reading the model"))) from None
    return files


def read_config(directory: Path) -> dict:
    """config.json, or a clear error saying this is not a Hugging Face model directory."""
    path = directory / "config.json"
    if not path.is_file():
        raise SourceError(f"{directory} is not a Hugging Face model directory: it has no config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise SourceError(str(file_system_error(exc, "reading the model"))) from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures or not isinstance(architectures, list) or not all(
            isinstance(name, str) for name in architectures):
        raise SourceError(f"{path} names no architectures; is this a causal language model checkpoint?")
    return config


def architecture(directory: Path) -> str:
    return read_config(directory)["architectures"][0]


def check_checkpoint(directory: Path) -> None:
    """Fail clearly on a directory that is not a complete safetensors checkpoint.

    Reads config.json and each safetensors header (a few kilobytes), never the tensors: a shard shorter
    than its header says (an interrupted copy or download) is caught here, before any backend sees it.
    """
    read_config(directory)
    shards = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            wanted = {validate.relative_path(name, "its weight_map") for name in weight_map.values()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError,
                validate.Invalid) as exc:
            raise SourceError(f"{index} is broken: {exc}") from None
        missing = sorted(w for w in wanted if not (directory / w).is_file())
        if missing:
            raise SourceError(f"{directory} is missing weight files named in its index: {', '.join(missing)}")
    if not shards:
        raise SourceError(f"{directory} has no *.safetensors weights (PyTorch .bin checkpoints are not read)")
    for shard in shards:
        _check_safetensors(shard)


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The length and content of a safetensors file's JSON header; a clear error if it has none."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise SourceError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 1024 * 1024):
            raise SourceError(f"{path} is not a safetensors file or is truncated (header of {header_len} bytes)")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SourceError(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} has a corrupt safetensors header")
    return header_len, header


def _check_safetensors(path: Path) -> None:
    header_len, header = safetensors_header(path)
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError):
        raise SourceError(f"{path} has a corrupt safetensors header") from None
    size = path.stat().st_size
    if size != 8 + header_len + end:
        raise SourceError(
            f"{path} is truncated or padded: its header describes {8 + header_len + end} bytes, "
            f"the file has {size}. Re-download or re-copy it."
        )


def local_source(spec: ModelSpec, cache: StatCache) -> Source:
    license = "mit" if spec.embedded else card_license(spec.path / "README.md")
    return Source(spec.path, digest_directory(spec.path, cache, spec.trust_remote_code), license=license)


def card_license(readme: Path) -> str | None:
    """The ``license:`` of a Hugging Face model card's YAML front matter, if it has one (read without a YAML
    parser: the field is one plain line)."""
    try:
        text = readme.read_text(errors="replace")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    for line in text.split("\n---", 1)[0].splitlines()[1:]:
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


def resolve_revision(spec: ModelSpec) -> str:
    """The commit the requested revision (default: main) points at now."""
    from huggingface_hub import HfApi, constants

    try:  # without a timeout, model_info waits forever on a hub that accepts but never answers
        return HfApi().model_info(spec.repo, revision=spec.revision or "main",
                                  timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "cannot resolve"
        raise SourceError(_hub_failure(spec, exc)) from None


def fetch(spec: ModelSpec, revision: str, cache: StatCache) -> Source:
    """Download (or resume) the model's build files at ``revision`` and verify them against the hub."""
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        info = HfApi().model_info(spec.repo, revision=revision, files_metadata=True,
                                  timeout=constants.HF_HUB_ETAG_TIMEOUT)
        directory = Path(snapshot_download(spec.repo, revision=revision, allow_patterns=list(spec.patterns())))
    except Exception as exc:
        raise SourceError(_hub_failure(spec, exc)) from None
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        path = directory / sibling.rfilename
        if lfs is None or not path.is_file():
            continue
        got = cache.digest(path, with_sha256=True)
        if got.size != lfs.size or got.sha256 != lfs.sha256:
            blob = path.resolve()  # the snapshot holds a symlink; huggingface_hub would relink a bad blob
            path.unlink()
            blob.unlink(missing_ok=True)
            raise SourceError(
                f"{spec.repo}@{revision}: {sibling.rfilename} does not match the hub's sha256 {lfs.sha256} "
                f"({got.size} bytes with sha256 {got.sha256} were downloaded); it was removed from the "
                "Hugging Face cache: build again to download it anew"
            )
    license = getattr(info.card_data, "license", None) if info.card_data else None
    return Source(directory, digest_directory(directory, cache, spec.trust_remote_code), revision,
                  license if isinstance(license, str) else None)


def _hub_failure(spec: ModelSpec, exc: Exception) -> str:
    return (
        f"cannot fetch {spec.name} ({spec.repo}) from the Hugging Face hub: {type(exc).__name__}: {exc}. "
        "Check the network, HF_TOKEN for gated models and HF_ENDPOINT, or point the model at a local "
        f"directory with [tool.phibuild.model.{spec.name}] path = \"...\""
    )
