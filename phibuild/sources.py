"""Where a model's files come from, what they digest to, and whether they are a usable checkpoint.

A local or embedded model is a directory. A hub model is downloaded with ``huggingface_hub`` at one
commit: the first build resolves the requested revision to a commit, the lock pins it, and later builds
download exactly that commit. Downloads resume and show progress (huggingface_hub's own), and every LFS
file is checked against the sha256 the hub publishes for it.
"""

from __future__ import annotations

import fnmatch
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import reading, validate
from .catalog import CODE_PATTERNS, SOURCE_PATTERNS, ModelSpec
from .errors import SourceError, file_system_error

if TYPE_CHECKING:  # hashing needs xxhash, which a toolchain's worker (reading model files here) does not have
    from .hashing import StatCache

MAX_DEPTH = 1  # a model's files lie at its top, its adapters one directory down
MAX_FILES = 10_000  # entries looked at in a model directory before it is taken for something else
# safetensors' dtypes and their sizes in bits (its F4 and F6 types pack several values in a byte)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


@dataclass(frozen=True)
class Source:
    """A model's files on disk, pinned by content."""

    directory: Path
    files: dict[str, str]  # relative posix path -> xxh3-128
    revision: str | None = None  # hub commit, None for local models
    license: str | None = None  # as the model card says (the hub's card data, or a local README.md's)

    @property
    def digest(self) -> str:
        from .hashing import digest_tree

        return digest_tree(self.files)


def source_files(directory: Path, trust_remote_code: bool = False) -> list[Path]:
    """The files in ``directory`` that a build reads (see ``SOURCE_PATTERNS``; the model's own ``*.py`` only
    with ``trust_remote_code``), sorted: at its top and one level down (Phi-4-multimodal's adapters), no deeper,
    and no more than ``MAX_FILES`` looked at: a directory that is not a model is not walked whole."""
    patterns = SOURCE_PATTERNS + (CODE_PATTERNS if trust_remote_code else ())
    found, seen = [], 0
    for root, dirs, names in os.walk(directory):
        depth = len(Path(root).relative_to(directory).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        seen += len(names) + len(dirs)
        if seen > MAX_FILES:
            raise SourceError(f"{directory} holds more than {MAX_FILES} files: it is not a model directory")
        for name in names:
            if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                found.append(Path(root) / name)
    return sorted(found)


def digest_directory(directory: Path, cache: StatCache, trust_remote_code: bool = False) -> dict[str, str]:
    """``{relative path: xxh3}`` for a model directory, through the stat cache; config.json is looked for first, so
    that a directory that is no model is refused before anything in it is hashed, and every file but the weights
    is held to the size of its kind before it is read."""
    _config_path(directory)  # a stat, not a parse: this runs for every target of every no-op run
    files = {}
    for path in source_files(directory, trust_remote_code):
        try:
            if not path.name.endswith(".safetensors") and path.stat().st_size > reading.LIMITS["model config"]:
                raise SourceError(f"{path} is larger than a model's {path.name} can be "
                                  f"({reading.LIMITS['model config'] // reading.MiB} MiB); it is not one")
            check = check_safetensors if path.name.endswith(".safetensors") else None  # a 2 TB sparse file: no
            files[path.relative_to(directory).as_posix()] = cache.digest(path, before_reading=check).xxh3_128
        except OSError as exc:
            raise SourceError(str(file_system_error(exc, "reading the model"))) from None
    return files


def read_json(path: Path, what: str = "model config") -> Any:
    """A JSON file of the model's, read bounded and parsed with its nesting limited; SourceError otherwise."""
    try:
        return reading.json_data(reading.read_bytes(path, what), str(path))
    except reading.Unreadable as exc:
        raise SourceError(str(exc)) from None
    except OSError as exc:
        raise SourceError(str(file_system_error(exc, "reading the model"))) from None


def read_config(directory: Path) -> dict:
    """config.json, or a clear error saying this is not a Hugging Face model directory."""
    path = _config_path(directory)
    config = read_json(path)
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures or not isinstance(architectures, list) or not all(
            isinstance(name, str) for name in architectures):
        raise SourceError(f"{path} names no architectures; is this a causal language model checkpoint?")
    return config


def _config_path(directory: Path) -> Path:
    """``directory``'s config.json, or a clear error saying this is not a Hugging Face model directory."""
    if not directory.is_dir():
        raise SourceError(f"model directory {directory} does not exist")
    path = directory / "config.json"
    if not path.exists():
        raise SourceError(f"{directory} is not a Hugging Face model directory: it has no config.json")
    return path


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
    if index.exists():
        try:
            weight_map = read_json(index)["weight_map"]
            wanted = {validate.relative_path(name, "its weight_map") for name in weight_map.values()}
        except (KeyError, TypeError, AttributeError, validate.Invalid) as exc:
            raise SourceError(f"{index} is broken: {exc}") from None
        missing = sorted(w for w in wanted if not (directory / w).is_file())
        if missing:
            raise SourceError(f"{directory} is missing weight files named in its index: {', '.join(missing)}")
    if not shards:
        raise SourceError(f"{directory} has no *.safetensors weights (PyTorch .bin checkpoints are not read)")
    for shard in shards:
        check_safetensors(shard)


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The length and content of a safetensors file's JSON header; a clear error if it has none."""
    try:
        fd = reading.open_regular(path)
    except OSError as exc:
        raise SourceError(str(file_system_error(exc, "reading the model"))) from None
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(fd).st_size
        head = handle.read(8)
        if len(head) < 8:
            raise SourceError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, reading.LIMITS["safetensors header"]):
            raise SourceError(f"{path} is not a safetensors file or is truncated (header of {header_len} bytes)")
        try:
            header = reading.json_data(handle.read(header_len), f"{path}'s safetensors header")
        except reading.Unreadable as exc:
            raise SourceError(str(exc)) from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} has a corrupt safetensors header: not a JSON object")
    return header_len, header


def check_safetensors(path: Path) -> None:
    """``path``'s header read as strictly as safetensors reads it: every tensor once (``json_data`` refuses a
    name given twice), a known dtype, a shape of whole numbers, offsets that tile the data from its first byte to
    the file's last without a gap or an overlap, each tensor exactly as long as its dtype and shape say."""
    header_len, header = safetensors_header(path)
    spans = []
    for name, tensor in header.items():
        if name == "__metadata__":
            if not isinstance(tensor, dict) or not all(isinstance(v, str) for v in tensor.values()):
                raise SourceError(f"{path} has a corrupt safetensors header: its __metadata__ must map strings to "
                                  "strings")
            continue
        spans.append((*_tensor_span(path, name, tensor), name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            gap = "an overlap" if begin < end else "a gap"
            raise SourceError(f"{path} has a corrupt safetensors header: tensor {name[:80]!r} starts at byte {begin} "
                              f"of the data where the one before ends at {end} ({gap}); safetensors refuses such a "
                              "file")
        end = stop
    size = os.path.getsize(path)
    if size != 8 + header_len + end:
        raise SourceError(
            f"{path} is truncated or padded: its header describes {8 + header_len + end} bytes, "
            f"the file has {size}. Re-download or re-copy it."
        )


def _tensor_span(path: Path, name: str, tensor: Any) -> tuple[int, int]:
    """The [begin, end) of one tensor's bytes, checked against its dtype and shape."""
    where = f"{path} has a corrupt safetensors header: tensor {name[:80]!r}"
    if not isinstance(tensor, dict) or set(tensor) != {"dtype", "shape", "data_offsets"}:
        raise SourceError(f"{where} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = tensor["dtype"], tensor["shape"], tensor["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise SourceError(f"{where} has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_whole(n) for n in shape):
        raise SourceError(f"{where} has a shape that is not a list of whole numbers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(n) for n in offsets):
        raise SourceError(f"{where} has data_offsets that are not two whole numbers")
    begin, end = offsets
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if end < begin or bits % 8 or end - begin != bits // 8:
        raise SourceError(f"{where} spans bytes {begin} to {end}, but its dtype {dtype} and shape {shape} need "
                          f"{bits / 8:g} bytes")
    return begin, end


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def local_source(spec: ModelSpec, cache: StatCache) -> Source:
    license = "mit" if spec.embedded else card_license(spec.path / "README.md")
    return Source(spec.path, digest_directory(spec.path, cache, spec.trust_remote_code), license=license)


def card_license(readme: Path) -> str | None:
    """The ``license:`` of a Hugging Face model card's YAML front matter, if it names one phibuild can pass on
    (read bounded, without a YAML parser: the field is one plain line; ``validate.clean_license``)."""
    try:
        text = reading.read_bytes(readme, "model card").decode(errors="replace")
    except (OSError, reading.Unreadable):
        return None
    if not text.startswith("---"):
        return None
    for line in text.split("\n---", 1)[0].splitlines()[1:]:
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return validate.clean_license(value)
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
                  validate.clean_license(license))


def _hub_failure(spec: ModelSpec, exc: Exception) -> str:
    return (
        f"cannot fetch {spec.name} ({spec.repo}) from the Hugging Face hub: {type(exc).__name__}: {exc}. "
        "Check the network, HF_TOKEN for gated models and HF_ENDPOINT, or point the model at a local "
        f"directory with [tool.phibuild.model.{spec.name}] path = \"...\""
    )
