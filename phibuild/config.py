"""A project's phibuild settings: ``[tool.phibuild]`` in its ``pyproject.toml``.

Every key is optional::

    [tool.phibuild]
    models = ["phi35-tiny", "phi35", "my-phi"]      # default: every model phibuild knows, and your own
    backends = ["onnx"]                             # default: every backend phibuild has
    precisions = ["int4", "int8", "fp16", "fp32"]   # default: all four
    store = ".phibuild"                             # content-addressed store
    build = "build"                                 # where artifacts are shown, one directory each
    lock = "artifacts.lock"
    default = ["phi35-tiny-int4-onnx"]              # what plain `doit` builds (default: every target of
                                                    # the embedded and local models: nothing to download)
    remote = "s3://team-bucket/phibuild"            # a store shared between machines (any fsspec URL);
                                                    # PHIBUILD_REMOTE overrides it
    remote_timeout = 10                             # seconds to connect, and for each read or write
    remote_transfer_timeout = 1800                  # seconds for a whole pull or push
    release = ["phi35-tiny-int4-onnx"]              # what `doit release` gathers (default: every locked one)
    release_dir = "release"
    report_dir = "report"                           # where `doit report` writes REPORT.md and its plots

    [tool.phibuild.remote_options]                  # passed to fsspec, e.g. endpoint_url for S3 look-alikes

    [tool.phibuild.publish]                         # doit publish: one Hugging Face repo per artifact
    repo = "me/{target}"                            # {target}, {model}, {precision}, {backend}
    private = true                                  # the token is HF_TOKEN's

    [tool.phibuild.key_packages]                    # more distributions a backend's key should cover
    onnx = ["accelerate"]

    [tool.phibuild.model.my-phi]                    # a model of your own (added to the default models)
    path = "checkpoints/my-phi"                     # a local directory...
    # repo = "me/my-phi"  revision = "main"         # ...or a Hugging Face repo
    # trust_remote_code = true                      # let the toolchains run the model's own *.py code

    eval_text = "eval/my-text.txt"                  # the fidelity step's evaluation text (default: the one
                                                    # shipped in phibuild/eval, disjoint from the corpus)
    eval_windows = 2                                # windows of eval_length tokens each: the KL's standard
    eval_length = 1024                              # error shrinks, and the cost grows, with their product

    [tool.phibuild.gates.int4]                      # fidelity thresholds per precision (defaults: GATES)
    kl = 0.05                                       # mean KL(reference || artifact), nats per token, at most
    top1 = 0.85                                     # top-1 agreement with the reference, at least

    [tool.phibuild.params.onnx]                     # parameters for every precision of a backend
    accuracy_level = 4
    [tool.phibuild.params.onnx.int4]                # and for one precision
    block_size = 64

The table is checked once, where it is read, against ``FIELDS``: an unknown key, a value of the wrong type
or a misspelled backend, precision or parameter is one message naming it; nothing unchecked is used.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import backends
from . import validate as v
from .catalog import EMBEDDED, HUB, ModelSpec, lookup
from .errors import ConfigError

EVAL_TEXT = Path(__file__).parent / "eval" / "heldout.txt"  # written by tools/make_eval_text.py
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def _path(value: Any, where: str) -> Path:
    if not v.text(value, where):
        raise v.Invalid(f"{where} must name a directory or file, not an empty string")
    return Path(value)


def _repo(value: Any, where: str) -> str:
    if not isinstance(value, str) or not REPO.match(value):
        raise v.Invalid(f"{where} must be a Hugging Face repository id like \"microsoft/Phi-3.5-mini-instruct\", "
                        f"not {value!r}")
    return value


MODEL_FIELDS = {"path": v.Field(_path, required=False), "repo": v.Field(_repo, required=False),
                "revision": v.Field(v.text, required=False),
                "trust_remote_code": v.Field(v.boolean, required=False)}


def _model_tables(value: Any, where: str) -> dict[str, dict[str, Any]]:
    models = {}
    for name, table in v.tables(value, where).items():
        context = f"[tool.phibuild.model.{name}]"
        v.name(name, f"{context}: the model name")
        checked = v.fields(table, MODEL_FIELDS, context)
        if ("path" in checked) == ("repo" in checked):
            raise v.Invalid(f"{context} needs exactly one of path or repo")
        if "revision" in checked and "repo" not in checked:
            raise v.Invalid(f"{context}: revision applies to a repo, not a local path")
        models[name] = checked
    return models


def _params(value: Any, where: str) -> dict[str, dict[str, Any]]:
    """``[params.<backend>]``: backend-wide scalars, and ``[params.<backend>.<precision>]`` tables of them."""
    checked = {}
    for backend_name, table in v.tables(value, where).items():
        context = f"[tool.phibuild.params.{backend_name}]"
        backend = backends.get(_known(backend_name, list(backends.MODULES), "backend", context))
        names = backend.parameter_names()
        entries: dict[str, Any] = {}
        for name, setting in table.items():
            if name in backend.precisions and not isinstance(setting, dict):
                raise v.Invalid(f"{context}.{name} must be a table of parameters, like "
                                f"[tool.phibuild.params.{backend_name}.{name}]")
            if isinstance(setting, dict):
                _known(name, list(backend.precisions), f"precision of backend {backend_name}", context)
                entries[name] = {param: v.scalar(value, f"{context[:-1]}.{name}].{param}")
                                 for param, value in setting.items()}
            else:
                _known(name, sorted(names), f"parameter of backend {backend_name}", context)
                entries[name] = v.scalar(setting, f"{context}.{name}")
        checked[backend_name] = entries
    return checked


def _known(name: str, choices: list[str], what: str, where: str) -> str:
    if name not in choices:
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise v.Invalid(f"{where}: {name!r} is not a {what}{hint}; choose from {', '.join(choices)}")
    return name


def _choices(allowed: tuple[str, ...], what: str):
    def check(value: Any, where: str) -> list[str]:
        return [_known(item, list(allowed), what, where) for item in v.name_list(value, where)]

    return check


# Fidelity gates per precision: a measured artifact past one fails its fidelity task. Set from the embedded
# models' measured figures (README, "Fidelity"), with room for other CPUs' kernels and runtime defaults (bf16
# execution where the CPU has it); a broken quantization is orders of magnitude past them.
GATES = {
    "fp32": {"kl": 1e-3, "top1": 0.98},
    "fp16": {"kl": 3e-3, "top1": 0.97},
    "int8": {"kl": 1e-2, "top1": 0.95},
    "int4": {"kl": 0.1, "top1": 0.8},
}
GATE_FIELDS = {"kl": v.Field(v.number, required=False), "top1": v.Field(v.number, required=False)}


def _gates(value: Any, where: str) -> dict[str, dict[str, float]]:
    checked = {}
    for precision, table in v.tables(value, where).items():
        context = f"[tool.phibuild.gates.{precision}]"
        _known(precision, list(backends.PRECISIONS), "precision", context)
        checked[precision] = v.fields(table, GATE_FIELDS, context)
    return checked


def _positive(value: Any, where: str) -> int:
    if v.count(value, where) < 1:
        raise v.Invalid(f"{where} must be at least 1")
    return value


PUBLISH_FIELDS = {"repo": v.Field(v.text), "private": v.Field(v.boolean, required=False)}
FIELDS = {
    "models": v.Field(v.name_list, required=False),
    "model": v.Field(_model_tables, required=False),
    "backends": v.Field(_choices(tuple(backends.MODULES), "backend"), required=False),
    "precisions": v.Field(_choices(backends.PRECISIONS, "precision"), required=False),
    "store": v.Field(_path, required=False),
    "build": v.Field(_path, required=False),
    "lock": v.Field(_path, required=False),
    "release_dir": v.Field(_path, required=False),
    "report_dir": v.Field(_path, required=False),
    "default": v.Field(v.name_list, required=False),
    "release": v.Field(v.name_list, required=False),
    "params": v.Field(_params, required=False),
    "remote": v.Field(v.text, required=False),
    "remote_options": v.Field(v.table_of(v.text, v.json_value), required=False),
    "remote_timeout": v.Field(v.seconds, required=False),
    "remote_transfer_timeout": v.Field(v.seconds, required=False),
    "key_packages": v.Field(v.table_of(v.name, v.name_list), required=False),
    "publish": v.Field(lambda value, where: v.fields(value, PUBLISH_FIELDS, where), required=False),
    "eval_text": v.Field(_path, required=False),
    "eval_windows": v.Field(_positive, required=False),
    "eval_length": v.Field(_positive, required=False),
    "gates": v.Field(_gates, required=False),
}


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
    remote_transfer_timeout: float = 1800.0
    release: list[str] | None = None  # None: every artifact in the lock
    release_dir: Path = Path("release")
    report_dir: Path = Path("report")
    key_packages: dict[str, list[str]] = field(default_factory=dict)
    publish: dict[str, Any] = field(default_factory=dict)  # repo pattern, private
    eval_text: Path | None = None  # None: the evaluation text shipped with phibuild
    eval_windows: int = 2
    eval_length: int = 1024
    gates: dict[str, dict[str, float]] = field(default_factory=dict)

    def eval_settings(self) -> tuple[Path, int, int]:
        """The fidelity step's evaluation text, and how many windows of how many tokens it is cut into."""
        text = self.root / self.eval_text if self.eval_text else EVAL_TEXT
        return text, self.eval_windows, self.eval_length

    def gate(self, precision: str) -> dict[str, float]:
        """The fidelity thresholds for ``precision``: the defaults, with the project's on top."""
        return {**GATES[precision], **self.gates.get(precision, {})}

    def model(self, name: str) -> ModelSpec:
        return lookup(name, self.custom_models)

    def overrides(self, backend: str, precision: str) -> dict[str, Any]:
        """``[params.<backend>]`` scalars (for the precisions that have that parameter), then
        ``[params.<backend>.<precision>]`` on top."""
        table = self.params.get(backend, {})
        own = backends.get(backend).precisions.get(precision, {})
        merged = {k: value for k, value in table.items() if not isinstance(value, dict) and k in own}
        merged.update(table.get(precision, {}))
        return merged


def load(root: Path) -> Config:
    """Read ``root/pyproject.toml``; a project without one (or without the table) gets the defaults."""
    root = root.resolve()
    path = root / "pyproject.toml"
    table: Any = {}
    if path.is_file():
        try:
            table = tomllib.loads(path.read_text()).get("tool", {}).get("phibuild", {})
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot be read ({exc})") from None
    try:
        settings = v.fields(table, FIELDS, "[tool.phibuild]")
    except v.Invalid as exc:
        raise ConfigError(f"{path}: {exc}") from None
    config = Config(root)
    config.custom_models = {name: ModelSpec(name, repo=spec.get("repo"), revision=spec.get("revision"),
                                            path=(root / spec["path"]) if "path" in spec else None,
                                            trust_remote_code=spec.get("trust_remote_code", False))
                            for name, spec in settings.pop("model", {}).items()}
    config.models = list(EMBEDDED) + list(HUB) + sorted(config.custom_models)
    for key, value in settings.items():
        setattr(config, key, value)
    config.remote = os.environ.get("PHIBUILD_REMOTE") or config.remote
    if config.remote and "://" not in config.remote:  # a plain directory, relative to the project
        config.remote = str(root / config.remote)
    for name in config.models:
        config.model(name)
    return config
