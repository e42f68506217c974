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

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import build, reading
from .backends import SMOKE_IMAGE, SMOKE_QUESTION, Job, platform_tag
from .catalog import VISION_ARCHITECTURES
from .errors import BuildError, ConfigError, DamageError, LockError
from .hashing import digest_json, hash_file
from .measuring import METRICS
from .project import Plan, Project, Target, frozen
from .records import MEASUREMENT, REFERENCE, Fidelity, KeyParts
from .status import status as artifact_status

log = logging.getLogger(__name__)

TOOLCHAIN = "fidelity"  # the toolchain the reference is computed in
REFERENCE_RECIPE = "1"  # bump when the reference is computed differently
RECIPE = "2"  # bump when a measurement is made differently (2: decode speed, the per-position curve locked)
REFERENCE_FILES = ("tokens.npy", "logprobs.npy")


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
                                lambda output: _make_reference(project, plan, output))
    parts = measurement_parts(project, plan, reference.key)
    job = Job(artifact.artifact, artifact.artifact, target.precision, dict(target.params),
              trust_remote_code=target.model.trust_remote_code, vision=vision(project, plan))
    entry, how = build.obtain(project, parts, f"{target.name}-fidelity", None,
                              lambda output: _make_measurement(project, plan, job, ref_entry.artifact, output))
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
    params = {"eval_text": digest, "windows": windows, "length": length}
    if vision(project, plan):  # the text follows the image prompt
        params.update(image=hash_file(SMOKE_IMAGE).xxh3_128, question=SMOKE_QUESTION)
    toolchain = project.toolchains[TOOLCHAIN].record(REFERENCE)
    return KeyParts(plan.parts.source, REFERENCE, toolchain, REFERENCE, params, REFERENCE_RECIPE,
                    {"platform": platform_tag()}, plan.parts.trust_remote_code)


def measurement_parts(project: Project, plan: Plan, reference: str) -> KeyParts:
    """The key components of a measurement: the artifact's key stands for its source."""
    backend = plan.target.backend
    return KeyParts(plan.key, backend.name, plan.parts.toolchain, MEASUREMENT, {"reference": reference}, RECIPE,
                    {"platform": platform_tag(), **backend.runtime_machine(project.facts(backend))},
                    plan.parts.trust_remote_code)


def _make_reference(project: Project, plan: Plan, output: Path) -> build.Made:
    """transformers' float32 log-probabilities over the evaluation windows, and the windows' token ids, computed
    in the fidelity toolchain's worker (``measuring.reference``)."""
    plan = project.fetched(plan)
    text, windows, length = project.config.eval_settings()
    label = f"{plan.target.model.name}-reference"
    log.info("computing the fidelity reference of %s in float32 transformers (%d windows of %d tokens)",
             plan.target.model.name, windows, length)
    failure = f"{label}: the reference failed"
    project.toolchains[TOOLCHAIN].run([{
        "verb": "reference", "failure": failure, "source": str(plan.source.directory),
        "trust_remote_code": plan.target.model.trust_remote_code, "text": str(text), "windows": windows,
        "length": length, "vision": vision(project, plan), "output": str(output)}], failure)
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


def _make_measurement(project: Project, plan: Plan, job: Job, reference: Path, output: Path) -> build.Made:
    """The runtime's logits for the reference's windows, compared with it, and its decoding speed: metrics.json,
    measured in the artifact's toolchain's worker (``measuring.measure``)."""
    target = plan.target
    log.info("measuring the fidelity of %s in %s's runtime", target.name, target.backend.title)
    failure = f"{target.name}-fidelity: {target.backend.title}'s runtime failed"
    build.run(project, plan, [build.step("measure", plan, job, failure, artifact=str(job.output),
                                         reference=str(reference), output=str(output))])
    return build.Made()


def _digits(value: float) -> float:
    return float(f"{value:.3g}")
