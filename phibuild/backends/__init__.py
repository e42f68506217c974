"""The backend interface, and the registry of backends by name.

A backend is one module (or package) here defining a subclass of :class:`Backend` named ``BACKEND``. It
declares

- ``name`` (used in task names), ``title`` and the ``toolchain`` it runs in (``phibuild.toolchains``): an
  environment of its own made from a hashed lock, whose digest and versions enter the cache key;
- ``precisions``: for each of int4/int8/fp16/fp32 the default parameters, all of which enter the key
  and can be overridden in ``[tool.phibuild.params.<backend>]`` / ``[...<backend>.<precision>]``;
  ``vision_defaults`` (optional): other defaults for multimodal models (the cookbook's vision recipes);
- ``architectures``: the Hugging Face architectures it can build;
- ``unlinkable`` (optional): output files its readers refuse as hardlinks, shown under ``build/`` as copies;
- ``unsupported`` (optional): Phi architectures it cannot build, with the reason users are told;

and implements ``check_params`` (what is wrong with parameter values: a settings error), optionally
``refuse_architecture`` (why an architecture it builds cannot be built with these parameters: the target
is left out) and ``machine`` (what of the machine and its toolchain, through ``facts``, its bytes depend on,
for the key), ``build`` (a
:class:`Job`: source directory to output directory) and ``smoke`` (load the output with the backend's own
runtime and generate a few tokens) and ``runtime`` (the output loaded in that runtime with its default settings,
for the fidelity step: next-token logits of a token sequence), with ``runtime_machine`` naming what of the
machine decides those defaults. A backend that builds a multimodal architecture (``Job.vision``) smoke-checks
it with ``SMOKE_IMAGE``, gives its runtime the image prompt before the text, and implements ``image_logits``
(the parity tests' float32 logits after the image prompt). ``facts``, ``build_intermediate``, ``build``, ``smoke`` and
``runtime`` run in the toolchain's worker (``phibuild.work``) and import the toolchain there (``image_logits``
in the parity tests, which have the toolchains' libraries); the rest runs in doit's process, which never
imports a toolchain and knows the toolchain by its package versions alone.

A backend whose precisions share a first step (GGUF: one F16 conversion, quantized several ways) returns
that step's parameters from ``intermediate`` and implements ``build_intermediate``; phibuild caches the
step in the store under its own key and hands its directory to ``build`` as ``job.intermediate``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import BuildError, ConfigError, PhibuildError
from ..toolchains.declare import platform_tag

PRECISIONS = ("int4", "int8", "fp16", "fp32")
# Phi's chat format; the smoke checks of every backend generate from this prompt.
SMOKE_MESSAGES = [{"role": "user", "content": "What does os.path.join do?"}]
SMOKE_TOKENS = 8
# Multimodal models: the same kind of chat prompt, about a small picture shipped with phibuild (drawn by
# tools/make_embedded_models.py). Each runtime marks the image in its own way (transformers' <|image|>,
# <|image_1|> in ONNX Runtime GenAI and OpenVINO GenAI) and expands it to the same image tokens.
SMOKE_IMAGE = Path(__file__).parent.parent / "eval" / "image.png"
SMOKE_QUESTION = "What is shown in this image?"

MODULES = {
    "onnx": "phibuild.backends.onnx",
    "gguf": "phibuild.backends.gguf",
    "openvino": "phibuild.backends.openvino",
    "mlx": "phibuild.backends.mlx",
}


@dataclass(frozen=True)
class Job:
    """One build step as a backend sees it: read ``source``, write into the empty directory ``output``."""

    source: Path
    output: Path
    precision: str
    params: dict[str, Any]
    intermediate: Path | None = None  # the shared first step's output, when the backend has one
    trust_remote_code: bool = False  # the model's own opt-in to running code from its directory
    vision: bool = False  # the model reads images as well as text (catalog.VISION_ARCHITECTURES)

    def to_dict(self) -> dict[str, Any]:
        """As a worker's step carries it."""
        return {**asdict(self), "source": str(self.source), "output": str(self.output),
                "intermediate": str(self.intermediate) if self.intermediate else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(**{**data, "source": Path(data["source"]), "output": Path(data["output"]),
                      "intermediate": Path(data["intermediate"]) if data["intermediate"] else None})


@dataclass(frozen=True)
class Smoke:
    """What the smoke check did: ``ran`` False means it could not run here, and ``detail`` says why."""

    ran: bool
    detail: str
    tokens: tuple[int, ...] = ()

    @classmethod
    def generated(cls, runtime: str, tokens: Sequence[int], text: str, note: str = "") -> Smoke:
        """A check in which ``runtime`` generated ``tokens`` (decoded: ``text``); none at all is a failure."""
        if not tokens:
            raise BuildError(f"{runtime} generated no tokens from the Phi chat prompt")
        return cls(True, f"{len(tokens)} tokens from a Phi chat prompt: {text!r}{note}", tuple(tokens))

    def summary(self) -> str:
        return f"ok: {self.detail}" if self.ran else f"not run: {self.detail}"


@contextlib.contextmanager
def replaced(owner: Any, **attributes: Any) -> Iterator[None]:
    """``owner``'s (a toolchain's class or module) attributes replaced for the duration of one step, then put
    back as they were: how phibuild changes a toolchain's behaviour without changing its files."""
    saved = {name: vars(owner)[name] for name in attributes}
    for name, value in attributes.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


class CannotRun(PhibuildError):
    """The artifact's runtime cannot run on this machine (a CUDA-only build, say); the message says why."""


class Runtime:
    """An artifact loaded in its backend's own runtime, with the runtime's default settings, as users run it."""

    settings: str = ""  # the runtime and what its defaults resolved to here, in a few words

    def logits(self, ids: Sequence[int]) -> Any:
        """Next-token logits at every position of ``ids``, a sequence of its own: float32, [len(ids), vocab]."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], count: int) -> float:
        """Tokens per second of greedy generation, one token at a time, of ``count`` tokens after the prompt
        ``ids`` (whose prefill is not timed), as the runtime's own generation loop runs it."""
        raise NotImplementedError


def cpu_flags() -> set[str]:
    """The processor's feature flags, as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


class Backend:
    name: ClassVar[str]
    title: ClassVar[str]
    toolchain: ClassVar[str]  # the toolchain it runs in (phibuild/toolchains/<name>)
    architectures: ClassVar[frozenset[str]]
    precisions: ClassVar[dict[str, dict[str, Any]]]
    recipe: ClassVar[int] = 1  # bump when phibuild's use of this backend changes the output
    unlinkable: ClassVar[tuple[str, ...]] = ()  # output globs shown as copies, never hardlinks of the store
    unsupported: ClassVar[dict[str, str]] = {}  # Phi architectures it cannot build, and why
    vision_defaults: ClassVar[dict[str, dict[str, Any]]] = {}  # multimodal models' defaults, where they differ

    def machine(self, facts: Callable[[], dict[str, str]], params: dict[str, Any]) -> dict[str, str]:
        """What of this machine and its toolchain the bytes made with ``params`` depend on, beyond package
        versions (``facts()``: what the toolchain's ``facts`` found, asked only when needed): it enters the key, so
        that another machine gets another key instead of other bytes under the same one. Every backend's bytes
        are verified only within one operating system and processor architecture, so that is the least it says."""
        return {"platform": platform_tag()}

    def facts(self) -> dict[str, str]:
        """What of its toolchain's environment, found by running it, keys or runtime settings depend on (run in
        the worker, once per environment)."""
        return {}

    def params(self, precision: str, overrides: dict[str, Any], vision: bool = False) -> dict[str, Any]:
        """Defaults for ``precision`` (a multimodal model's own where ``vision_defaults`` has them) with
        ``overrides`` applied; unknown names are an error."""
        if precision not in self.precisions:
            raise ConfigError(
                f"backend {self.name} has no precision {precision!r}; choose one of {', '.join(self.precisions)}"
            )
        params = dict(self.precisions[precision])
        if vision:
            params.update(self.vision_defaults.get(precision, {}))
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            raise ConfigError(
                f"backend {self.name} at {precision} has no parameter {', '.join(unknown)}; "
                f"its parameters are {', '.join(sorted(params))}"
            )
        params.update(overrides)
        problem = self.check_params(precision, params)
        if problem:
            raise ConfigError(f"backend {self.name} at {precision}: {problem}")
        return params

    def parameter_names(self) -> set[str]:
        """Every parameter name of any precision (a backend-wide setting must be one of them)."""
        return {name for defaults in self.precisions.values() for name in defaults}

    def check_params(self, precision: str, params: dict[str, Any]) -> str | None:
        """What is wrong with these parameter values, whatever the model, or None."""
        return None

    def refuse(self, architecture: str, precision: str, params: dict[str, Any], packages: dict[str, str]) -> str | None:
        """Why a model of this architecture cannot be built with these (checked) parameters by a toolchain of
        these ``packages`` (name: version), in a few words (``doit list`` gathers them on one line), or None."""
        if architecture in self.unsupported:
            return self.unsupported[architecture]
        if architecture not in self.architectures:
            return f"{self.title} builds {', '.join(sorted(self.architectures))}, not {architecture}"
        return self.refuse_architecture(architecture, precision, params, packages)

    def refuse_architecture(self, architecture: str, precision: str, params: dict[str, Any],
                            packages: dict[str, str]) -> str | None:
        """Why an architecture the backend builds cannot be built with these parameters, or None."""
        return None

    def intermediate(self, precision: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """Parameters of the shared step this build starts from, or None when it starts from the source."""
        return None

    def build_intermediate(self, job: Job) -> None:
        raise NotImplementedError

    def build(self, job: Job) -> None:
        """Write the artifact into the empty directory ``job.output``."""
        raise NotImplementedError

    def smoke(self, artifact: Path, job: Job) -> Smoke:
        raise NotImplementedError

    def runtime(self, artifact: Path, job: Job) -> Runtime:
        """``artifact`` loaded in the backend's runtime with its defaults; raises CannotRun when it cannot run
        here."""
        raise NotImplementedError

    def image_logits(self, artifact: Path, job: Job) -> Any:
        """A multimodal artifact's next-token logits (float32, [vocab]) after the chat prompt asking
        ``SMOKE_QUESTION`` about ``SMOKE_IMAGE``, computed in the backend's runtime in float32: what the parity
        check compares with transformers."""
        raise NotImplementedError

    def fidelity_cause(self, model: Any, precision: str, params: dict[str, Any]) -> str | None:
        """A known reason the runtime's output differs from the source's for this model (a ModelSpec) and
        these parameters, said beside a failed fidelity gate; None when there is none."""
        return None

    def runtime_machine(self, facts: Callable[[], dict[str, str]]) -> dict[str, str]:
        """What of this machine decides the runtime's default settings, beyond the platform (a fidelity
        measurement's key holds it: another machine measures under another key)."""
        return {}


def get(name: str) -> Backend:
    """The backend called ``name``; its module is imported on first use."""
    if name not in MODULES:
        raise ConfigError(f"unknown backend {name!r}; phibuild has {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name]).BACKEND()
