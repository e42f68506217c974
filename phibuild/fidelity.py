"""The fidelity step: how closely an artifact's next-token distributions follow its FP32 source's, measured
in the artifact's own runtime with the runtime's defaults, as users run it. Top to bottom::

    reference  once per source model: transformers in float32 over the evaluation text (``eval_windows``
               windows of ``eval_length`` + 1 tokens), its log-probabilities at every position; a store entry
               keyed by the source digest, the text's digest and shape, and the torch/transformers versions
    measure    once per artifact: the runtime's logits for the same token ids, compared position by position
               (KL(reference || artifact), top-1 agreement, perplexity), then the speed of greedy decoding; a
               store entry keyed by the artifact's key, the reference's, the runtime's toolchain and what of the
               machine decides its defaults
    record     the figures in the artifact's lock entry, where they stand while the artifact, the reference and
               the way of measuring (RECIPE) do: a no-op run measures nothing
    gate       figures past the project's thresholds for the precision fail the task

Both steps go through ``build.obtain``, so they are cached in the store (and shared through the remote) as
builds are. The reference and the measurement are floating-point computations on this machine's kernels:
their figures agree between machines within their standard error, not to the bit, so they are never pinned.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import build, reading
from .backends import SMOKE_IMAGE, SMOKE_QUESTION, TRANSFORMERS_OPTIONAL, CannotRun, Job, console_kept, platform_tag
from .catalog import VISION_ARCHITECTURES
from .environment import covered_only
from .errors import BuildError, ConfigError, DamageError, LockError
from .hashing import digest_json, hash_file
from .project import Plan, Project, Target, frozen
from .records import MEASUREMENT, REFERENCE, Fidelity, KeyParts
from .status import status as artifact_status

log = logging.getLogger(__name__)

EXTRA = "fidelity"  # the pip extra the reference is computed with: its closure is the reference's toolchain
REFERENCE_RECIPE = "1"  # bump when the reference is computed differently
RECIPE = "2"  # bump when a measurement is made differently (2: decode speed, the per-position curve locked)
BUCKETS = 16  # the per-position view: mean KL over this many equal spans of a window's positions
DECODE_PROMPT = 64  # decode speed: greedy tokens generated one at a time after a prompt of this many tokens
DECODE_TOKENS = 32
REFERENCE_FILES = ("tokens.npy", "logprobs.npy")
METRICS = "metrics.json"


@dataclass(frozen=True)
class Measured:
    """What the task reports: the lock's record, and how it came."""

    record: Fidelity
    how: str


def measure(project: Project, target: Target) -> Measured:
    """The fidelity record of ``target``'s built artifact: the lock's, while it stands, else measured now (or
    found in the store or the remote) and written into the lock."""
    locked = project.lock.get(target.name)
    plan = project.plan(target)
    if locked is None or locked.key != plan.key:
        raise BuildError(f"{target.name}: not built; `doit quantize:{target.name}` builds it")
    reference = reference_parts(project, plan)
    if _stands(locked.fidelity, reference.key):
        checked(project, target.name, locked.fidelity)
        return Measured(locked.fidelity, "as artifacts.lock records it")
    if frozen():
        raise LockError(f"{target.name}: artifacts.lock has no fidelity record for reference {reference.key} "
                        f"measured by recipe {RECIPE}, and "
                        "PHIBUILD_FROZEN is set, so it is left as it is; measure without it and commit the lock")
    artifact = project.store.find(locked.key, locked.files)
    if artifact is None:
        raise BuildError(f"{target.name}: artifact {locked.key} is not in the store; `doit quantize:{target.name}` "
                         "restores or builds it")
    ref_entry, _ = build.obtain(project, reference, f"{target.model.name}-reference", None,
                                lambda output: _make_reference(project, plan, reference, output))
    parts = measurement_parts(project, plan, reference.key)
    job = Job(artifact.artifact, artifact.artifact, target.precision, dict(target.params),
              trust_remote_code=target.model.trust_remote_code, vision=vision(project, plan))
    entry, how = build.obtain(project, parts, f"{target.name}-fidelity", None,
                              lambda output: _make_measurement(plan, job, ref_entry.artifact, output))
    record = replace(stored_record(entry.artifact, reference.key, parts.key, f"{target.name}'s measurement"),
                     files=dict(entry.files))
    project.lock.put(target.name, replace(locked, fidelity=record))
    return Measured(record, how)


def stored_record(artifact: Path, reference: str, measurement: str, what: str) -> Fidelity:
    """The lock's record of the measurement in a store entry's ``artifact`` directory: read bounded, every figure
    checked as the lock checks it (finite, in its range) before it can be written anywhere."""
    path = artifact / METRICS
    try:
        metrics = reading.json_data(reading.read_bytes(path, "measurement"), str(path))
        if not isinstance(metrics, dict):
            raise TypeError("not a JSON object")
        data: dict[str, Any] = {"reference": reference, "measurement": measurement, "runtime": metrics["runtime"],
                                "recipe": RECIPE}
        if "not_run" in metrics:
            data["not_run"] = metrics["not_run"]
        else:
            data.update({name: _digits(metrics[name]) for name in Fidelity.FIGURES}, tokens=metrics["tokens"],
                        kl_by_position=[_digits(value) for value in metrics["kl_by_position"]])
        return Fidelity.from_dict(data, what)
    except (reading.Unreadable, OSError, KeyError, TypeError, ValueError) as exc:
        raise DamageError(f"{what} ({path}) is not a measurement phibuild can record: {exc}") from None


def checked(project: Project, name: str, record: Fidelity) -> bool:
    """Whether ``record`` (a lock's) was checked against the measurement it names: found in the store, or pulled
    from the remote by the files the record pins. A figure that disagrees with the measurement is an error, as an
    edited digest is. False when the measurement is in neither place: the lock's figures stand, unchecked here,
    and a card says so."""
    try:
        stored = project.store.get(record.measurement)
    except DamageError:
        stored = None
    if stored is None and record.files:
        stored = project.remote.pull(record.measurement, record.files, project.store)
    if stored is None:
        return False
    if record.files and stored.files != record.files:
        raise LockError(f"{name}: artifacts.lock pins other files for the measurement {record.measurement} than the "
                        "store holds: the lock was edited; restore it from git, or remove the fidelity record and run "
                        f"`doit fidelity:{name}`")
    measured = stored_record(stored.artifact, record.reference, record.measurement, f"{name}'s measurement")
    mine, theirs = replace(record, recipe=measured.recipe, files=None).to_dict(), measured.to_dict()
    if mine != theirs:
        differ = [field for field, value in theirs.items() if mine.get(field) != value]
        raise LockError(f"{name}: artifacts.lock's fidelity record disagrees with the measurement {record.measurement} "
                        f"in the store ({', '.join(differ)}): the lock was edited; restore it from git, or remove "
                        f"the record and run `doit fidelity:{name}`")
    return True


def status(project: Project, target: Target) -> str | None:
    """None when the lock's fidelity record of ``target`` stands and passes its gate, else why not."""
    stale = artifact_status(project, target)
    if stale:
        return f"the artifact is not up to date ({stale})"
    locked = project.lock.get(target.name)
    if locked is None or locked.fidelity is None:
        return "not measured yet"
    if locked.fidelity.reference != reference_parts(project, project.plan(target)).key:
        return "the reference changed (the source, the evaluation text or the torch/transformers versions)"
    if locked.fidelity.recipe != RECIPE:
        return f"measured by an older recipe ({locked.fidelity.recipe}; phibuild's is {RECIPE})"
    checked(project, target.name, locked.fidelity)
    return gate(project, target, locked.fidelity)


def _stands(record: Fidelity | None, reference: str) -> bool:
    """Whether a lock's fidelity record is current: measured against ``reference``, the current way."""
    return record is not None and record.reference == reference and record.recipe == RECIPE


def gate(project: Project, target: Target, record: Fidelity) -> str | None:
    """Why ``record`` fails the project's gate for the target's precision, or None."""
    if record.not_run is not None:
        return None
    limits = project.config.gate(target.precision)
    where = f"[tool.phibuild.gates.{target.precision}]"
    if record.kl > limits["kl"]:
        return (f"mean KL {record.kl:.3g} nats/token is over the gate {limits['kl']:g} ({where} kl)"
                + _known_cause(target))
    if record.top1 < limits["top1"]:
        return (f"top-1 agreement {record.top1:.1%} is under the gate {limits['top1']:.1%} ({where} top1)"
                + _known_cause(target))
    return None


def _known_cause(target: Target) -> str:
    cause = target.backend.fidelity_cause(target.model, target.precision, target.params)
    return f"; known cause: {cause}" if cause else ""


def reference_parts(project: Project, plan: Plan) -> KeyParts:
    """The key components of the reference for ``plan``'s source model."""
    text, windows, length = project.config.eval_settings()
    digest = digest_json(eval_text(text))
    try:
        toolchain = project.environment.toolchain(REFERENCE, EXTRA, TRANSFORMERS_OPTIONAL)
    except LookupError as exc:
        raise ConfigError(f"the fidelity reference needs {exc}, which is not installed: "
                          f"pip install 'phibuild[{EXTRA}]'") from None
    params = {"eval_text": digest, "windows": windows, "length": length}
    if vision(project, plan):  # the text follows the image prompt
        params.update(image=hash_file(SMOKE_IMAGE).xxh3_128, question=SMOKE_QUESTION)
    return KeyParts(plan.parts.source, REFERENCE, toolchain, REFERENCE, params, REFERENCE_RECIPE,
                    {"platform": platform_tag()}, plan.parts.trust_remote_code)


def measurement_parts(project: Project, plan: Plan, reference: str) -> KeyParts:
    """The key components of a measurement: the artifact's key stands for its source."""
    backend = plan.target.backend
    return KeyParts(plan.key, backend.name, plan.parts.toolchain, MEASUREMENT, {"reference": reference}, RECIPE,
                    {"platform": platform_tag(), **backend.runtime_machine()}, plan.parts.trust_remote_code)


def _make_reference(project: Project, plan: Plan, parts: KeyParts, output: Path) -> build.Made:
    """transformers' float32 log-probabilities over the evaluation windows, and the windows' token ids."""
    import numpy as np

    plan = project.fetched(plan)
    text, windows, length = project.config.eval_settings()
    label = f"{plan.target.model.name}-reference"
    log.info("computing the fidelity reference of %s in float32 transformers (%d windows of %d tokens)",
             plan.target.model.name, windows, length)
    with covered_only(parts.toolchain, label, EXTRA), console_kept(f"{label}: the reference failed"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, remote = str(plan.source.directory), plan.target.model.trust_remote_code
        ids = AutoTokenizer.from_pretrained(source, trust_remote_code=remote)(
            eval_text(text), add_special_tokens=False)["input_ids"]
        needed = windows * (length + 1)
        if len(ids) < needed:
            raise ConfigError(f"the evaluation text {text} is {len(ids)} tokens long for {plan.target.model.name}; "
                              f"{windows} windows of {length} need {needed}")
        tokens = np.array(ids[:needed], dtype=np.int32).reshape(windows, length + 1)
        if vision(project, plan):
            logits = _after_image_prompt(source, remote, tokens[:, :-1])
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=remote)
            with torch.no_grad():
                logits = model(torch.from_numpy(tokens[:, :-1]).long()).logits
        logprobs = torch.log_softmax(logits.double(), dim=-1).float().numpy()
    np.save(output / "tokens.npy", tokens)
    np.save(output / "logprobs.npy", logprobs)
    return build.Made()


def eval_text(path: Path) -> str:
    """The evaluation text, read bounded."""
    try:
        return reading.read_text(path, "evaluation text")
    except (reading.Unreadable, OSError) as exc:
        raise ConfigError(f"the evaluation text {path} cannot be read ({exc})") from None


def vision(project: Project, plan: Plan) -> bool:
    """Whether the model reads images: its text is then measured after the image prompt."""
    return project.architecture(plan.target.model) in VISION_ARCHITECTURES


def _after_image_prompt(source: str, remote: bool, windows: Any) -> Any:
    """Logits of each window's tokens following the image prompt (``backends.image_prompt``), [windows, length,
    vocab]. Eager attention: with SDPA, transformers 5.5's Phi-4-multimodal vision encoder runs causally on a
    crop without padding (its attention is marked causal and an all-ones mask is dropped), which no runtime does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    from .backends import image_prompt

    prompt = image_prompt.inputs(AutoProcessor.from_pretrained(source, trust_remote_code=remote))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=remote,
                                                 attn_implementation="eager")
    start = prompt["input_ids"].shape[1]
    with torch.no_grad():
        return torch.stack([model(**image_prompt.followed_by(prompt, window)).logits[0, start:]
                            for window in windows.tolist()])


def _make_measurement(plan: Plan, job: Job, reference: Path, output: Path) -> build.Made:
    """The runtime's logits for the reference's windows, compared with it, and its decoding speed: metrics.json."""
    import numpy as np

    target = plan.target
    label = f"{target.name}-fidelity"
    tokens = np.load(reference / "tokens.npy")
    logprobs = np.load(reference / "logprobs.npy", mmap_mode="r")
    log.info("measuring the fidelity of %s in %s's runtime (%d tokens)", target.name, target.backend.title,
             tokens[:, 1:].size)
    with (covered_only(plan.parts.toolchain, label, target.backend.extra),
          console_kept(f"{label}: {target.backend.title}'s runtime failed")):
        try:
            runtime = target.backend.runtime(job.output, job)
        except CannotRun as exc:
            metrics: dict[str, Any] = {"runtime": target.backend.title, "not_run": str(exc)}
        else:
            start, logits = time.perf_counter(), []
            for window in tokens:
                logits.append(runtime.logits([int(token) for token in window[:-1]]))
            elapsed = time.perf_counter() - start
            prompt = [int(token) for token in tokens[0, :DECODE_PROMPT]]
            metrics = {"runtime": runtime.settings, **compare(logprobs, tokens, logits),
                       "prefill_tps": tokens[:, 1:].size / elapsed,
                       "decode_tps": runtime.decode(prompt, DECODE_TOKENS)}
    (output / METRICS).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return build.Made()


def compare(logprobs: Any, tokens: Any, logits: list[Any]) -> dict[str, Any]:
    """Figures of an artifact's logits (one [length, vocab] array per window) against the reference's
    log-probabilities ([windows, length, vocab]) on the windows' token ids ([windows, length + 1]).

    The standard error treats positions as independent; neighbouring positions are not, so it is a lower bound.
    """
    import numpy as np

    _, length, vocab = logprobs.shape
    kl, agree, nll, nll_reference = [], [], [], []
    for index, got in enumerate(logits):
        if got.shape != (length, vocab):
            raise BuildError(f"the runtime gave logits of shape {got.shape} for a window of {length} tokens over "
                             f"a vocabulary of {vocab}")
        p_log = np.asarray(logprobs[index], dtype=np.float64)
        q = got.astype(np.float64)
        peak = q.max(axis=-1, keepdims=True)
        q_log = q - peak - np.log(np.exp(q - peak).sum(axis=-1, keepdims=True))
        kl.append(np.maximum((np.exp(p_log) * (p_log - q_log)).sum(axis=-1), 0.0))
        agree.append(p_log.argmax(axis=-1) == q_log.argmax(axis=-1))
        following = tokens[index, 1:]
        nll.append(-q_log[np.arange(length), following])
        nll_reference.append(-p_log[np.arange(length), following])
    kl_all, quarter = np.stack(kl), max(1, length // 4)
    return {
        "tokens": int(kl_all.size),
        "kl": float(kl_all.mean()),
        "kl_se": float(kl_all.std() / math.sqrt(kl_all.size)),
        "kl_early": float(kl_all[:, :quarter].mean()),
        "kl_late": float(kl_all[:, -quarter:].mean()),
        "kl_by_position": [float(span.mean()) for span in np.array_split(kl_all, min(BUCKETS, length), axis=1)],
        "top1": float(np.stack(agree).mean()),
        "ppl": float(np.exp(np.stack(nll).mean())),
        "ppl_reference": float(np.exp(np.stack(nll_reference).mean())),
    }


def _digits(value: float) -> float:
    return float(f"{value:.3g}")
