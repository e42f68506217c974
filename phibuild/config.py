"""A project's phibuild settings: ``[tool.phibuild]`` in its ``pyproject.toml``.

Every key is optional::

    [tool.phibuild]
    models = ["phi35-tiny", "phi35", "my-phi"]      # default: the embedded models
    backends = ["onnx"]                             # default: every backend phibuild has
    precisions = ["int4", "int8", "fp16", "fp32"]   # default: all four
    store = ".phibuild"                             # content-addressed store
    build = "build"                                 # where artifacts are shown, one directory each
    lock = "artifacts.lock"
    default = ["phi35-tiny-int4-onnx"]              # what plain `doit` builds
    remote = "s3://team-bucket/phibuild"            # a store shared between machines (any fsspec URL);
                                                    # PHIBUILD_REMOTE overrides it
    remote_timeout = 10                             # seconds to wait for the remote before building locally
    release = ["phi35-tiny-int4-onnx"]              # what `doit release` gathers (default: every locked one)
    release_dir = "release"

    [tool.phibuild.remote_options]                  # passed to fsspec, e.g. endpoint_url for S3 look-alikes

    [tool.phibuild.model.my-phi]                    # a model of your own (added to the default models)
    path = "checkpoints/my-phi"                     # a local directory...
    # repo = "me/my-phi"  revision = "main"         # ...or a Hugging Face repo

    [tool.phibuild.params.onnx]                     # parameters for every precision of a backend
    accuracy_level = 4
    [tool.phibuild.params.onnx.int4]                # and for one precision
    block_size = 64
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import backends
from .catalog import EMBEDDED, ModelSpec, lookup
from .errors import ConfigError

KEYS = {"models", "model", "backends", "precisions", "store", "build", "lock", "default", "params", "remote",
        "remote_options", "remote_timeout", "release", "release_dir"}


@dataclass
class Config:
    root: Path
    models: list[str] = field(default_factory=lambda: list(EMBEDDED))
    backends: list[str] = field(default_factory=lambda: list(backends.MODULES))
    precisions: list[str] = field(default_factory=lambda: list(backends.PRECISIONS))
    store: Path = Path(".phibuild")
    build: Path = Path("build")
    lock: Path = Path("artifacts.lock")
    default: list[str] = field(default_factory=list)
    custom_models: dict[str, ModelSpec] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    remote: str | None = None
    remote_options: dict[str, Any] = field(default_factory=dict)
    remote_timeout: float = 10.0
    release: list[str] | None = None  # None: every artifact in the lock
    release_dir: Path = Path("release")

    def model(self, name: str) -> ModelSpec:
        return lookup(name, self.custom_models)

    def overrides(self, backend: str, precision: str) -> dict[str, Any]:
        """``[params.<backend>]`` scalars, then ``[params.<backend>.<precision>]`` on top."""
        table = self.params.get(backend, {})
        merged = {k: v for k, v in table.items() if not isinstance(v, dict)}
        merged.update(table.get(precision, {}))
        return merged


def load(root: Path) -> Config:
    """Read ``root/pyproject.toml``; a project without one (or without the table) gets the defaults."""
    root = root.resolve()
    path = root / "pyproject.toml"
    table: dict[str, Any] = {}
    if path.is_file():
        try:
            table = tomllib.loads(path.read_text()).get("tool", {}).get("phibuild", {})
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown [tool.phibuild] keys {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}"
        )
    config = Config(root)
    config.custom_models = _custom_models(table.get("model", {}), root, path)
    config.models = list(EMBEDDED) + sorted(config.custom_models)
    for key in ("models", "backends", "precisions", "default", "release"):
        if key in table:
            names = table[key]
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise ConfigError(f"{path}: {key} must be a list of names, like {key} = [\"a\", \"b\"], "
                                  f"not {names!r}")
            setattr(config, key, names)
    for key in ("store", "build", "lock", "release_dir"):
        if key in table:
            setattr(config, key, Path(table[key]))
    for key in ("params", "remote", "remote_options", "remote_timeout"):
        if key in table:
            setattr(config, key, table[key])
    config.remote = os.environ.get("PHIBUILD_REMOTE") or config.remote
    if config.remote and "://" not in config.remote:  # a plain directory, relative to the project
        config.remote = str(root / config.remote)
    _validate(config, path)
    return config


def _custom_models(tables: dict[str, Any], root: Path, path: Path) -> dict[str, ModelSpec]:
    specs = {}
    for name, spec in tables.items():
        if not isinstance(spec, dict) or ("path" in spec) == ("repo" in spec):
            raise ConfigError(f"{path}: [tool.phibuild.model.{name}] needs exactly one of path or repo")
        extra = sorted(set(spec) - {"path", "repo", "revision"})
        if extra:
            raise ConfigError(f"{path}: [tool.phibuild.model.{name}] has unknown keys {', '.join(extra)}")
        local = (root / spec["path"]) if "path" in spec else None
        specs[name] = ModelSpec(name, repo=spec.get("repo"), revision=spec.get("revision"), path=local)
    return specs


def _validate(config: Config, path: Path) -> None:
    for name in config.models:
        config.model(name)
    for name in config.backends:
        backends.get(name)
    bad = [p for p in config.precisions if p not in backends.PRECISIONS]
    if bad:
        raise ConfigError(f"{path}: unknown precision {', '.join(bad)}; choose from {', '.join(backends.PRECISIONS)}")
    unknown_params = sorted(set(config.params) - set(backends.MODULES))
    if unknown_params:
        raise ConfigError(f"{path}: [tool.phibuild.params] names unknown backend {', '.join(unknown_params)}")
