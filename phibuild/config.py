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
    trusted_keys = ["ci-1:BASE64..."]               # pull only entries signed by one of these (ed25519, as Nix);
                                                    # a writer signs with the key file PHIBUILD_SIGNING_KEY names
    release = ["phi35-tiny-int4-onnx"]              # what `doit release` gathers (default: every locked one)
    release_dir = "release"
    report_dir = "report"                           # where `doit report` writes REPORT.md and its plots

    [tool.phibuild.remote_options]                  # passed to fsspec, e.g. endpoint_url for S3 look-alikes

    [tool.phibuild.publish]                         # doit publish: one Hugging Face repo per artifact
    repo = "me/{target}"                            # {target}, {model}, {precision}, {backend}
    private = true                                  # the token is HF_TOKEN's

    [tool.phibuild.toolchains]                      # an environment of your own for a toolchain (its key is
    onnx = "/opt/conda/envs/ort/bin/python"         # what it holds), instead of one made from phibuild's lock

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
import itertools
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import backends
from . import validate as v
from .catalog import EMBEDDED, HUB, ModelSpec, lookup
from .errors import ConfigError
from .signing import PublicKey
from .toolchains import declare

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
GATE_FIELDS = {"kl": v.Field(v.number, required=False), "top1": v.Field(v.share, required=False)}


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


def _eval_length(value: Any, where: str) -> int:
    """Tokens per evaluation window: at least the decode-speed prompt and its tokens (fidelity.py), and a few more."""
    if v.count(value, where) < MIN_EVAL_LENGTH:
        raise v.Invalid(f"{where} must be at least {MIN_EVAL_LENGTH} tokens")
    return value


MIN_EVAL_LENGTH = 128


def _repo_pattern(value: Any, where: str) -> str:
    """``[publish] repo``: a pattern whose only fields are ``{target}``, ``{model}``, ``{precision}`` and
    ``{backend}`` (no attributes, indexes or formats), giving a repository id; checked here, not at publish time."""
    v.text(value, where)
    try:
        fields = [field for _, field, spec, conversion in string.Formatter().parse(value)
                  if field is not None and (field not in PATTERN_FIELDS or spec or conversion)]
    except ValueError as exc:
        raise v.Invalid(f"{where} = {value!r}: {exc}") from None
    if fields:
        raise v.Invalid(f"{where} = {value!r} uses {{{fields[0]}}}; it may use only "
                        + ", ".join(f"{{{name}}}" for name in PATTERN_FIELDS))
    example = value.format(**{name: "phi35-int4-onnx" if name == "target" else "x" for name in PATTERN_FIELDS})
    if not REPO.match(example):
        raise v.Invalid(f"{where} = {value!r} gives {example!r}, not a repository id like \"you/phi35-int4-onnx\"")
    return value


def _trusted_keys(value: Any, where: str) -> list[PublicKey]:
    """``trusted_keys``: public keys, each name once (a card's "signed by NAME" must say which key signed)."""
    keys = [PublicKey.from_text(text, f"{where}[{index}]") for index, text in enumerate(v.text_list(value, where))]
    v.unique([key.name for key in keys], where)
    return keys


def _own_toolchains(value: Any, where: str) -> dict[str, Path]:
    """``[toolchains]``: toolchain name -> the interpreter of an environment of the user's own, an absolute path
    without ``..`` (phibuild runs it; it never writes there)."""
    chosen = {}
    for name, text in v.table_of(v.text, v.text)(value, where).items():
        _known(name, list(declare.NAMES), "toolchain", where)
        path = Path(text)
        if not path.is_absolute() or ".." in path.parts:
            raise v.Invalid(f"{where}.{name} = {text!r} must be the absolute path of an interpreter, without '..'")
        chosen[name] = path
    return chosen


PATTERN_FIELDS = ("target", "model", "precision", "backend")
PUBLISH_FIELDS = {"repo": v.Field(_repo_pattern), "private": v.Field(v.boolean, required=False)}
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
    "trusted_keys": v.Field(lambda value, where: _trusted_keys(value, where), required=False),
    "publish": v.Field(lambda value, where: v.fields(value, PUBLISH_FIELDS, where), required=False),
    "eval_text": v.Field(_path, required=False),
    "eval_windows": v.Field(_positive, required=False),
    "eval_length": v.Field(_eval_length, required=False),
    "gates": v.Field(_gates, required=False),
    "toolchains": v.Field(lambda value, where: _own_toolchains(value, where), required=False),
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
    trusted_keys: list[PublicKey] = field(default_factory=list)  # pull only entries signed by one of these
    release: list[str] | None = None  # None: every artifact in the lock
    release_dir: Path = Path("release")
    report_dir: Path = Path("report")
    publish: dict[str, Any] = field(default_factory=dict)  # repo pattern, private
    eval_text: Path | None = None  # None: the evaluation text shipped with phibuild
    eval_windows: int = 2
    eval_length: int = 1024
    gates: dict[str, dict[str, float]] = field(default_factory=dict)
    toolchains: dict[str, Path] = field(default_factory=dict)  # environments of the user's own, by toolchain

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
    table = _table(path)
    try:
        settings = v.fields(table, FIELDS, "[tool.phibuild]")
    except v.Invalid as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for name in SWITCHES:
        switch(name)
    config = Config(root)
    config.custom_models = {name: ModelSpec(name, repo=spec.get("repo"), revision=spec.get("revision"),
                                            path=(root / spec["path"]) if "path" in spec else None,
                                            trust_remote_code=spec.get("trust_remote_code", False))
                            for name, spec in settings.pop("model", {}).items()}
    config.models = list(EMBEDDED) + list(HUB) + sorted(config.custom_models)
    for key, value in settings.items():
        setattr(config, key, value)
    remote = os.environ.get("PHIBUILD_REMOTE")
    if remote:
        try:
            config.remote = v.text(remote, "PHIBUILD_REMOTE")
        except v.Invalid as exc:
            raise ConfigError(str(exc)) from None
    if config.remote and "://" not in config.remote:  # a plain directory, relative to the project
        config.remote = str(root / config.remote)
    _check_places(config)
    for name in config.models:
        config.model(name)
    return config


def _table(path: Path) -> Any:
    """``[tool.phibuild]`` of ``pyproject.toml`` (read bounded); a table near that name when it is missing is a
    misspelling, said in one line rather than silently ignored."""
    from . import reading

    try:
        data = reading.toml_data(reading.read_text(path, "settings"), str(path))
    except FileNotFoundError:
        return {}
    except reading.Unreadable as exc:
        raise ConfigError(str(exc)) from None
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise ConfigError(f"{path}: [tool] must be a table")
    if "phibuild" not in tool:
        names = {str(name).lower(): str(name) for name in tool}
        near = difflib.get_close_matches("phibuild", list(names), n=1, cutoff=0.75)
        if near:
            raise ConfigError(f"{path}: [tool.{names[near[0]]}] is not read by phibuild; did you mean "
                              "[tool.phibuild]?")
    return tool.get("phibuild", {})


# Boolean environment switches (project.py reads them): what each value means, and nothing else is taken.
SWITCHES = ("PHIBUILD_FROZEN", "PHIBUILD_RESTORE_ONLY", "PHIBUILD_REPIN")
ON, OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def switch(name: str) -> bool:
    """A boolean environment switch: 1, true, yes or on; 0, false, no, off or unset (any case); anything else
    is refused in one line, so that a typo never turns a safety switch silently off."""
    value = os.environ.get(name, "")
    if value.strip().lower() in ON:
        return True
    if value.strip().lower() in OFF:
        return False
    raise ConfigError(f"{name}={value[:40]!r} is neither on ({', '.join(ON)}) nor off ({', '.join(OFF[1:])}, or "
                      "unset)")


# The directories phibuild writes in and replaces whole, and the lock it rewrites: each must be a place of its own.
# All but the store (which several projects may share) lie inside the project, below no symlink.
PLACES = ("build", "release_dir", "report_dir", "store", "lock")


def local_remote(url: str) -> str | None:
    """The directory a remote writes in when it is on this machine: a plain path, ``file://`` or ``local://``, at
    the end of an fsspec chain (``simplecache::file://...``) too; None for any other filesystem."""
    target = url.split("::")[-1]
    scheme, separator, rest = target.partition("://")
    if not separator:
        return target
    return rest if scheme in ("file", "local") else None


def _check_places(config: Config) -> None:
    """One path policy for every setting that names a place phibuild writes, checked when the settings are read,
    before anything is written: inside the project (the store may be outside), named without ``..``, never the
    project itself or a directory holding it, never reached through a symlink, a directory where a directory is
    meant and a ``.lock`` file where the lock is, and no two of them overlapping (a plain-directory remote
    included). What phibuild only reads is held to it too: the evaluation text lies inside the project, and no
    model lies in one of phibuild's places (a release or a gc would take it with it)."""
    root = config.root
    places: dict[str, Path] = {}
    for name in PLACES:
        value = getattr(config, name)
        said = f"[tool.phibuild] {name} = {str(value)!r}"
        real = (root / value).resolve()
        if real == root or root.is_relative_to(real):
            raise ConfigError(f"{said} is the project{' or holds it' if real != root else ''}: phibuild would "
                              f"write over it; give it a {'directory' if name != 'lock' else 'file'} of its own")
        if name != "store":
            if ".." in Path(value).parts:
                raise ConfigError(f"{said}: name a place inside the project without '..'")
            lexical = Path(os.path.normpath(root / value))
            if not lexical.is_relative_to(root):
                raise ConfigError(f"{said} lies outside the project ({lexical}); it must lie inside it")
            if real != lexical:
                raise ConfigError(f"{said} leads through a symlink (to {real}); phibuild writes only to real paths "
                                  "inside the project")
        if name == "lock" and (real.is_dir() or not real.name.endswith(".lock")):
            raise ConfigError(f"{said} must name a file ending in .lock, which phibuild may rewrite whole")
        if name != "lock" and real.exists() and not real.is_dir():
            raise ConfigError(f"{said} is a file; phibuild needs a directory there")
        places[name] = real
    remote = local_remote(config.remote) if config.remote else None
    if remote is not None:
        places["remote"] = (root / remote).resolve()
        if places["remote"] == root or root.is_relative_to(places["remote"]):
            raise ConfigError(f"the remote {config.remote} is the project or holds it; give it a directory of its own")
    for (one, a), (other, b) in itertools.combinations(places.items(), 2):
        if a == b or a.is_relative_to(b) or b.is_relative_to(a):
            raise ConfigError(f"[tool.phibuild] {one} ({a}) and {other} ({b}) overlap; each needs a place of its own")
    read = {f"[tool.phibuild.model.{name}] path": spec.path for name, spec in config.custom_models.items()
            if spec.path is not None}
    if config.eval_text is not None:
        text = (root / config.eval_text).resolve()
        if not text.is_relative_to(root):
            raise ConfigError(f"[tool.phibuild] eval_text = {str(config.eval_text)!r} lies outside the project "
                              f"({text}); the evaluation text is hashed into keys shared through the remote")
        read["[tool.phibuild] eval_text"] = text
    for said, path in read.items():
        real = path.resolve()
        inside = [name for name, place in places.items() if name != "lock" and real.is_relative_to(place)]
        if inside:
            raise ConfigError(f"{said} ({real}) lies in phibuild's {inside[0]}, which phibuild replaces or removes "
                              "in; keep it elsewhere")
        recorded = path.relative_to(root) if path.is_relative_to(root) else path  # as Project.origin records it
        if len(f"path:{recorded}") > v.MAX_TEXT or len(f"path:{real}") > v.MAX_TEXT:
            raise ConfigError(f"{said} is longer than phibuild records a path ({v.MAX_TEXT} characters)")
