"""The records phibuild writes and reads back: key components, toolchains, store manifests, lock entries.

Each is a small frozen dataclass with one ``from_dict`` that validates (``validate.fields`` against a table
declared once) and one ``to_dict`` that is its exact inverse, as dvc-data's ``HashInfo`` and
``DataIndexEntry`` are. Whatever enters from a file, a remote or another machine's lock passes through
``from_dict`` before anything uses it; a record that does not parse is damage, never a traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from . import validate as v
from .hashing import FileDigest, digest_json


def _files(value: Any, where: str) -> dict[str, FileDigest]:
    """An artifact's files by relative path: none of them inside another's name, as a directory (``a`` and
    ``a/b`` cannot both be files)."""
    files = v.table_of(v.relative_path, FileDigest.from_dict)(value, where)
    parents = {"/".join(name.split("/")[:depth]) for name in files for depth in range(1, name.count("/") + 1)}
    clash = sorted(parents & files.keys())
    if clash:
        raise v.Invalid(f"{where} names {clash[0]!r} both as a file and as a directory")
    return files


FILES = _files
PYTHON = re.compile(r"[a-z]+-[0-9]+\.[0-9]+\Z")  # toolchains.declare.python_tag(): "cpython-3.11"
SHA256 = re.compile(r"[0-9a-f]{64}\Z")
INTERMEDIATE = "intermediate"  # the precision of a backend's shared first step
REFERENCE = "reference"  # the precision of a source model's reference logits (fidelity.py)
MEASUREMENT = "fidelity"  # the precision of an artifact's fidelity measurement (fidelity.py)


def files_to_dict(files: dict[str, FileDigest]) -> dict[str, dict]:
    return {name: digest.to_dict() for name, digest in sorted(files.items())}


def differing_files(one: dict[str, FileDigest], other: dict[str, FileDigest]) -> list[str]:
    """The names whose digests differ between two file tables, or that only one of them has."""
    return sorted(name for name in one.keys() | other.keys() if one.get(name) != other.get(name))


@dataclass(frozen=True)
class Toolchain:
    """The software a backend builds with: its toolchain lock's digest, the interpreter and every distribution
    the lock installs."""

    backend: str
    python: str
    packages: dict[str, str]  # distribution -> exact version
    lock: str = ""  # sha256 of the toolchain's lock file; none in locks written before toolchains had their own

    TABLE = {"backend": v.Field(v.name), "python": v.Field(lambda value, where: v.pattern(PYTHON, value, where)),
             "packages": v.Field(v.table_of(v.distribution, v.version)),
             "lock": v.Field(lambda value, where: v.pattern(SHA256, value, where), required=False)}

    @property
    def id(self) -> str:
        """How artifacts.lock refers to it: the backend and a digest of the content, so equal ids mean equal
        toolchains and slice locks merge their tables without conflicts."""
        return f"{self.backend}-{digest_json(self.to_dict())[:16]}"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Toolchain:
        return cls(**v.fields(data, cls.TABLE, where))

    def to_dict(self) -> dict[str, Any]:
        lock = {"lock": self.lock} if self.lock else {}
        return {"backend": self.backend, "python": self.python, **lock, "packages": dict(sorted(self.packages.items()))}

    def differences(self, other: Toolchain) -> list[str]:
        """``name old -> new`` for each package (and the interpreter) that differs from ``other``."""
        old = {"python": other.python, "lock": other.lock[:12] or "(none)", **other.packages}
        new = {"python": self.python, "lock": self.lock[:12] or "(none)", **self.packages}
        return [f"{name} {old.get(name, '(none)')} -> {new.get(name, '(none)')}"
                for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]


@dataclass(frozen=True)
class KeyParts:
    """Everything that can change an artifact's bytes; the cache key is their digest. No paths, no times."""

    source: str  # digest of the source model's files
    backend: str
    toolchain: Toolchain
    precision: str
    params: dict[str, Any]
    recipe: str  # phibuild's own pipeline version, and the backend's
    machine: dict[str, str]  # what of the machine the backend's output depends on (see Backend.machine)
    trust_remote_code: bool = False

    TABLE = {"source": v.Field(v.key), "backend": v.Field(v.name), "toolchain": v.Field(Toolchain.from_dict),
             "precision": v.Field(v.name), "params": v.Field(v.table_of(v.name, v.scalar)),
             "recipe": v.Field(v.text), "machine": v.Field(v.table_of(v.name, v.text)),
             "trust_remote_code": v.Field(v.boolean, required=False)}

    @property
    def key(self) -> str:
        return digest_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, where: str) -> KeyParts:
        return cls(**v.fields(data, cls.TABLE, where))

    def to_dict(self) -> dict[str, Any]:
        parts = {"source": self.source, "backend": self.backend, "toolchain": self.toolchain.to_dict(),
                 "precision": self.precision, "params": dict(self.params), "recipe": self.recipe,
                 "machine": dict(self.machine)}
        if self.trust_remote_code:
            parts["trust_remote_code"] = True
        return parts

    def differences(self, old: KeyParts) -> list[str]:
        """What changed from ``old``, one phrase each (``doit info``, frozen mode)."""
        changes = []
        if self.source != old.source:
            changes.append(f"source: {old.source[:12]}... -> {self.source[:12]}...")
        for part in ("backend", "precision", "recipe", "trust_remote_code"):
            if getattr(self, part) != getattr(old, part):
                changes.append(f"{part}: {getattr(old, part)} -> {getattr(self, part)}")
        changes += [f"versions: {change}" for change in self.toolchain.differences(old.toolchain)]
        for part in ("params", "machine"):
            new_table, old_table = getattr(self, part), getattr(old, part)
            changes += [f"{part}: {name} {old_table.get(name, '(none)')} -> {new_table.get(name, '(none)')}"
                        for name in sorted(old_table.keys() | new_table.keys())
                        if old_table.get(name) != new_table.get(name)]
        return changes


@dataclass(frozen=True)
class Smoke:
    """What the smoke check said, and where it ran: here, or on the machine a pulled artifact came from.

    An artifact pulled for a key artifacts.lock did not pin carries ``pulled_from`` and, until someone vouches
    for it, no ``trusted_by``: release and publish refuse it. It is vouched for by a trusted signature on the
    remote (``signed by NAME``) or by ``doit reproduce`` rebuilding the same bytes here (Nix's binary caches work
    the same way: a path is substituted only when signed by a trusted key, or built locally)."""

    result: str  # "ok: 8 tokens from a Phi chat prompt: '...'" or "not run: <why>"
    pulled_from: str | None = None
    trusted_by: str | None = None  # why a pulled artifact is trusted; None: nobody vouched for it yet

    TABLE = {"result": v.Field(v.text), "pulled_from": v.Field(v.text, required=False),
             "trusted_by": v.Field(v.text, required=False)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Smoke:
        smoke = cls(**v.fields(data, cls.TABLE, where))
        if smoke.trusted_by and not smoke.pulled_from:
            raise v.Invalid(f"{where}: trusted_by belongs to a pulled artifact, and this one names no remote")
        return smoke

    def to_dict(self) -> dict[str, str]:
        return {"result": self.result, **({"pulled_from": self.pulled_from} if self.pulled_from else {}),
                **({"trusted_by": self.trusted_by} if self.trusted_by else {})}

    @property
    def unverified(self) -> bool:
        """Pulled from a remote for a key the lock did not pin, and vouched for by nobody."""
        return self.pulled_from is not None and self.trusted_by is None

    def summary(self) -> str:
        if not self.pulled_from:
            return self.result
        trust = (f"trusted: {self.trusted_by}" if self.trusted_by
                 else "UNVERIFIED: no trusted signature, not rebuilt here")
        return f"{self.result} (checked where it was built; pulled from {self.pulled_from}; {trust})"


@dataclass(frozen=True)
class Manifest:
    """A store entry's description, beside its files (and on a remote, under its key)."""

    key: str
    label: str  # the target, or the intermediate, it was made for
    parts: KeyParts
    files: dict[str, FileDigest]
    smoke: Smoke | None = None  # artifacts have one, intermediates do not
    intermediate: Pin | None = None  # the intermediate it was built from, and its files

    TABLE = {"key": v.Field(v.key), "label": v.Field(v.name), "parts": v.Field(KeyParts.from_dict),
             "files": v.Field(FILES), "smoke": v.Field(Smoke.from_dict, required=False),
             "intermediate": v.Field(lambda value, where: Pin.from_dict(value, where), required=False)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Manifest:
        manifest = cls(**v.fields(data, cls.TABLE, where))
        if manifest.parts.key != manifest.key:
            raise v.Invalid(f"{where}: its key components digest to {manifest.parts.key}, not to its key")
        if not manifest.files:
            raise v.Invalid(f"{where} lists no files")
        if (manifest.smoke is None) == manifest.is_artifact:
            raise v.Invalid(f"{where}: an artifact records its smoke check, an intermediate or measurement none")
        return manifest

    @property
    def is_artifact(self) -> bool:
        """An artifact, as opposed to a backend's shared first step (GGUF: the conversion) or a fidelity
        reference or measurement, which no smoke check runs on."""
        return self.parts.precision not in (INTERMEDIATE, REFERENCE, MEASUREMENT)

    def to_dict(self) -> dict[str, Any]:
        data = {"key": self.key, "label": self.label, "parts": self.parts.to_dict(),
                "files": files_to_dict(self.files)}
        if self.smoke is not None:
            data["smoke"] = self.smoke.to_dict()
        if self.intermediate:
            data["intermediate"] = self.intermediate.to_dict()
        return data

    def pulled(self, url: str, trusted_by: str | None) -> Manifest:
        """This manifest as the local store keeps it once pulled from ``url``: the smoke check ran there, and
        ``trusted_by`` says why it is trusted (None: for nothing but its own word)."""
        if self.smoke is None:
            return self
        return replace(self, smoke=Smoke(self.smoke.result, self.smoke.pulled_from or url, trusted_by))


@dataclass(frozen=True)
class Pin:
    """A key and the files the lock expects under it."""

    key: str
    files: dict[str, FileDigest]

    TABLE = {"key": v.Field(v.key), "files": v.Field(FILES)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Pin:
        return cls(**v.fields(data, cls.TABLE, where))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "files": files_to_dict(self.files)}


# Each fidelity figure's range: a KL is at least 0, an agreement a share, a perplexity at least 1, a speed above 0.
FIGURE_CHECKS = {"kl": v.number, "kl_se": v.number, "kl_early": v.number, "kl_late": v.number, "top1": v.share,
                 "ppl": v.perplexity, "ppl_reference": v.perplexity, "prefill_tps": v.positive,
                 "decode_tps": v.positive}


@dataclass(frozen=True)
class Fidelity:
    """An artifact's quality against its FP32 source, measured in its own runtime (fidelity.py), as the lock
    records it: three significant digits, so that the figures read the same wherever they are shown.

    ``not_run`` says why the runtime could not run here (a CUDA-only build), and then no figure is given.
    """

    reference: str  # key of the source model's reference logits
    measurement: str  # key of the measurement, in the store
    runtime: str  # the runtime and the settings it ran with (its defaults, as users get them)
    recipe: str = "1"  # how the measurement was made (fidelity.RECIPE): a record of an older way is stale
    tokens: int = 0  # positions compared
    kl: float = 0.0  # mean KL(reference || artifact), nats per token
    kl_se: float = 0.0  # its standard error
    kl_early: float = 0.0  # mean KL over the first quarter of each window's positions
    kl_late: float = 0.0  # and over the last quarter: a growing error shows here
    top1: float = 0.0  # share of positions whose most likely next token agrees with the reference's
    ppl: float = 0.0  # perplexity of the evaluation text under the artifact
    ppl_reference: float = 0.0  # and under the reference
    prefill_tps: float = 0.0  # tokens/s of the evaluation on the machine that measured it (informational)
    decode_tps: float = 0.0  # tokens/s generating one token at a time, there (informational)
    kl_by_position: tuple[float, ...] = ()  # mean KL over equal spans of a window's positions, first to last
    not_run: str | None = None
    files: dict[str, FileDigest] | None = None  # the measurement's files, pinned as an artifact's are

    FIGURES = ("kl", "kl_se", "kl_early", "kl_late", "top1", "ppl", "ppl_reference", "prefill_tps", "decode_tps")
    TABLE = {"reference": v.Field(v.key), "measurement": v.Field(v.key), "runtime": v.Field(v.text),
             "recipe": v.Field(v.text, required=False), "tokens": v.Field(v.count, required=False),
             "not_run": v.Field(v.text, required=False), "files": v.Field(FILES, required=False),
             "kl_by_position": v.Field(v.number_list, required=False),
             **{figure: v.Field(check, required=False) for figure, check in FIGURE_CHECKS.items()}}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Fidelity:
        """A record with either every figure, each in its range, or the reason there are none."""
        got = v.fields(data, cls.TABLE, where)
        measured = [name for name in (*cls.FIGURES, "tokens", "kl_by_position") if name in got]
        if "not_run" in got:
            if measured:
                raise v.Invalid(f"{where}: a record that says why it was not measured has no figures "
                                f"({', '.join(measured)})")
        else:
            missing = sorted({*cls.FIGURES, "tokens"} - set(measured))
            if missing:
                raise v.Invalid(f"{where}: a fidelity record has either all its figures or the reason they are "
                                f"missing; it lacks {', '.join(missing)}")
            if got["tokens"] < 1:
                raise v.Invalid(f"{where}.tokens: a measurement compares at least one position")
        return cls(**got)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"reference": self.reference, "measurement": self.measurement,
                                "runtime": self.runtime, "recipe": self.recipe}
        if self.files:
            data["files"] = files_to_dict(self.files)
        if self.not_run is not None:
            return {**data, "not_run": self.not_run}
        return {**data, "tokens": self.tokens, **{figure: getattr(self, figure) for figure in self.FIGURES},
                "kl_by_position": list(self.kl_by_position)}

    def summary(self) -> str:
        """One line: what ``doit info`` and the task print."""
        if self.not_run is not None:
            return f"not measured: {self.not_run}"
        return (f"KL {self.kl:.3g} ± {self.kl_se:.2g} nats/token (first quarter {self.kl_early:.3g}, last "
                f"{self.kl_late:.3g}), top-1 {self.top1:.1%}, perplexity {self.ppl:.4g} (reference "
                f"{self.ppl_reference:.4g}) over {self.tokens} tokens in {self.runtime}; {self.prefill_tps:.4g} "
                f"tokens/s prefill, {self.decode_tps:.4g} decode")


@dataclass(frozen=True)
class LockEntry:
    """One artifact as artifacts.lock pins it. Its key components are stored flat, the toolchain by id."""

    model: str
    source: str  # where the model came from: "embedded:NAME", "path:DIR", "hf:REPO[@REVISION]"
    parts: KeyParts
    key: str
    files: dict[str, FileDigest]
    smoke: Smoke
    revision: str | None = None  # the hub commit, for hub models
    intermediate: Pin | None = None
    license: str | None = None  # the source model's, as its card says
    fidelity: Fidelity | None = None  # the artifact's measured quality, once measured
    TABLE = {"model": v.Field(v.name), "source": v.Field(v.text), "revision": v.Field(v.commit, required=False),
             "source_digest": v.Field(v.key), "backend": v.Field(v.name), "toolchain": v.Field(v.text),
             "precision": v.Field(v.name), "params": v.Field(v.table_of(v.name, v.scalar)),
             "recipe": v.Field(v.text), "machine": v.Field(v.table_of(v.name, v.text)),
             "trust_remote_code": v.Field(v.boolean, required=False), "key": v.Field(v.key),
             "files": v.Field(FILES), "smoke": v.Field(Smoke.from_dict),
             "intermediate": v.Field(Pin.from_dict, required=False), "license": v.Field(v.license_id, required=False),
             "fidelity": v.Field(Fidelity.from_dict, required=False)}

    @classmethod
    def from_dict(cls, data: Any, toolchains: dict[str, Toolchain], where: str) -> LockEntry:
        got = v.fields(data, cls.TABLE, where)
        toolchain = toolchains.get(got["toolchain"])
        if toolchain is None:
            raise v.Invalid(f"{where}.toolchain names {got['toolchain']!r}, which no [toolchains] table defines")
        parts = KeyParts(got["source_digest"], got["backend"], toolchain, got["precision"], got["params"],
                         got["recipe"], got["machine"], got.get("trust_remote_code", False))
        if parts.key != got["key"]:
            raise v.Invalid(f"{where}: its key components digest to {parts.key}, not to its key {got['key']} "
                            "(edited by hand?); remove the entry and build it again")
        if not got["files"]:
            raise v.Invalid(f"{where} lists no files")
        return cls(got["model"], got["source"], parts, got["key"], got["files"], got["smoke"],
                   got.get("revision"), got.get("intermediate"), got.get("license"), got.get("fidelity"))

    def to_dict(self) -> dict[str, Any]:
        parts = self.parts
        data: dict[str, Any] = {
            "model": self.model, "source": self.source, "source_digest": parts.source, "backend": parts.backend,
            "toolchain": parts.toolchain.id, "precision": parts.precision, "params": dict(parts.params),
            "recipe": parts.recipe, "machine": dict(parts.machine), "key": self.key,
            "files": files_to_dict(self.files), "smoke": self.smoke.to_dict(),
        }
        if parts.trust_remote_code:
            data["trust_remote_code"] = True
        if self.revision:
            data["revision"] = self.revision
        if self.intermediate:
            data["intermediate"] = self.intermediate.to_dict()
        if self.license:
            data["license"] = self.license
        if self.fidelity:
            data["fidelity"] = self.fidelity.to_dict()
        return data

    def pinned(self, key: str) -> dict[str, FileDigest] | None:
        """The files this entry pins for ``key``, or None when it pins another key."""
        return self.files if key == self.key else None

    def intermediate_files(self, key: str) -> dict[str, FileDigest] | None:
        """The files this entry pins for intermediate ``key``, or None."""
        return self.intermediate.files if self.intermediate and self.intermediate.key == key else None


@dataclass(frozen=True)
class Lock:
    """A whole lock file: artifacts by target name, and the toolchains they were built with."""

    artifacts: dict[str, LockEntry]

    FORMAT = 2
    TABLE = {"version": v.Field(v.count), "artifacts": v.Field(v.tables, required=False),
             "toolchains": v.Field(v.tables, required=False)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Lock:
        got = v.fields(data, cls.TABLE, where)
        if got["version"] != cls.FORMAT:
            raise v.Invalid(f"{where}: lock format version {got['version']}; this phibuild reads {cls.FORMAT}. "
                            "A lock of an older phibuild pins keys this one does not compute: remove it (git "
                            "keeps the old one) and build again")
        toolchains = {}
        for ident, table in got.get("toolchains", {}).items():
            toolchain = Toolchain.from_dict(table, f"{where}: [toolchains.{ident}]")
            if toolchain.id != ident:
                raise v.Invalid(f"{where}: [toolchains.{ident}] does not digest to its name (edited by hand?)")
            toolchains[ident] = toolchain
        artifacts = {}
        for target, table in got.get("artifacts", {}).items():
            context = f"{where}: [artifacts.{target}]"
            artifacts[v.name(target, context)] = LockEntry.from_dict(table, toolchains, context)
        return cls(artifacts)

    def to_dict(self) -> dict[str, Any]:
        toolchains = {entry.parts.toolchain.id: entry.parts.toolchain.to_dict() for entry in self.artifacts.values()}
        data: dict[str, Any] = {"version": self.FORMAT,
                                "artifacts": {name: entry.to_dict() for name, entry in self.artifacts.items()}}
        if toolchains:
            data["toolchains"] = toolchains
        return data

