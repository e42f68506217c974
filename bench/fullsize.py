"""Benchmark 8: full-size Phi checkpoints through `doit`, each build inside a hard memory limit.

Synthetic checkpoints with the published shapes (shared/phi-family.md), random bfloat16 weights, sharded as the hub
ships them (``model-0000N-of-0000M.safetensors`` of at most 5 GB and ``model.safetensors.index.json``):

- phi35-mini: Phi-3.5-mini-instruct, 32 layers, hidden 3072, intermediate 8192, 32 heads, 32064 rows, longrope
  with 48 factors (3.8B parameters, 7.6 GB);
- phi4: phi-4, 40 layers, hidden 5120, intermediate 17920, 40 heads and 10 KV heads, 100352 rows, theta 250000,
  16k context (14.7B parameters, 29 GB).

The tokenizer files are the embedded look-alike's (phi35-tiny's SentencePiece, phi4-mini-tiny's byte-level BPE):
like the real models', their tokens are fewer than the embedding rows. For each model, backend and precision,
`doit quantize:<model>-<precision>-<backend>` runs in a fresh project (empty store, smoke check included) inside
a v1 memory cgroup with the limit given, then the backend's own command (benchlib.raw_command) under the same
limit. Recorded: wall time, the cgroup's memory.max_usage_in_bytes (page cache included: it is reclaimed before
anything is killed), peak RssAnon sampled every 20 ms (anonymous memory: what a limit really has to hold),
whether it finished, and for a failure its last lines. Each project and raw output is removed once measured.

Needs root (the cgroup) and free disk: the source, twice its size for the GGUF F16 intermediate and the
artifact, checked before anything is written. Prints what it does as it goes.

    python bench/fullsize.py [--dir DIR] [--models phi35-mini phi4] [--backends ...] [--precisions int4]
                             [--limit-gib 8] [--no-raw | --raw-only] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from benchlib import (
    BACKENDS,
    ENV,
    GiB,
    doit,
    installed_backends,
    machine,
    raw_command,
    run,
    secs,
    size,
    table,
    write_project,
    write_safetensors,
)

from phibuild.catalog import EMBEDDED_DIR

SHARD_BYTES = 5 * 10**9  # the hub's shards are at most 5 GB
CGROUP = Path("/sys/fs/cgroup/memory")
ARTIFACT = {"int4": 0.35, "int8": 0.6, "fp16": 1.0, "fp32": 2.0}  # an artifact's size, as a share of the bf16 source


@dataclass(frozen=True)
class Shape:
    """A published Phi shape (shared/phi-family.md) and the look-alike whose config and tokenizer it starts from."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    like: str  # the embedded model whose config.json and tokenizer files are the starting point
    config: dict  # what else differs from the look-alike's config.json

    def tensors(self) -> dict[str, tuple[int, ...]]:
        head = self.hidden // self.heads
        qkv = (self.heads + 2 * self.kv_heads) * head
        found: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            prefix = f"model.layers.{i}."
            found |= {prefix + "input_layernorm.weight": (self.hidden,),
                      prefix + "self_attn.qkv_proj.weight": (qkv, self.hidden),
                      prefix + "self_attn.o_proj.weight": (self.hidden, self.hidden),
                      prefix + "post_attention_layernorm.weight": (self.hidden,),
                      prefix + "mlp.gate_up_proj.weight": (2 * self.intermediate, self.hidden),
                      prefix + "mlp.down_proj.weight": (self.hidden, self.intermediate)}
        return found | {"model.norm.weight": (self.hidden,), "lm_head.weight": (self.vocab, self.hidden)}

    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensors().values())

    def config_json(self) -> dict:
        return json.loads((EMBEDDED_DIR / self.like / "config.json").read_text()) | {
            "hidden_size": self.hidden, "intermediate_size": self.intermediate, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "num_hidden_layers": self.layers, "vocab_size": self.vocab,
            **self.config}


def _factors(count: int, like: str) -> dict:
    """The look-alike's longrope factors, resampled to ``count``."""
    rope = json.loads((EMBEDDED_DIR / like / "config.json").read_text())["rope_scaling"]
    for key in ("long_factor", "short_factor"):
        old = np.array(rope[key])
        rope[key] = np.interp(np.linspace(0, len(old) - 1, count), np.arange(len(old)), old).tolist()
    return rope


@dataclass(frozen=True)
class Multimodal:
    """Phi-4-multimodal's published shape in transformers' native layout (Phi4MultimodalForCausalLM): its tensors
    are the ones transformers' own class has, so nothing is listed by hand."""

    like: str  # the embedded look-alike whose tokenizer, processor and config it starts from
    config: dict  # what differs from the look-alike's config.json (top level; vision_config, audio_config: theirs)

    def _model(self):
        import torch
        from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

        config = json.loads((EMBEDDED_DIR / self.like / "config.json").read_text())
        for part in ("vision_config", "audio_config"):  # the real sizes are the classes' defaults
            config[part] = {k: v for k, v in config[part].items() if k.endswith("_token_id")}
        config |= self.config
        rope = config["rope_parameters"]
        count = int(config["hidden_size"] // config["num_attention_heads"] * rope["partial_rotary_factor"]) // 2
        for key in ("long_factor", "short_factor"):  # the look-alike's factors, resampled to the real head size
            old = np.array(rope[key])
            rope[key] = np.interp(np.linspace(0, len(old) - 1, count), np.arange(len(old)), old).tolist()
        with torch.device("meta"):
            return Phi4MultimodalForCausalLM(Phi4MultimodalConfig(**config))

    def tensors(self) -> dict[str, tuple[int, ...]]:
        model = self._model()
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}

    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensors().values())

    def config_json(self) -> dict:
        return self._model().config.to_dict()


MODELS = {
    "phi35-mini": Shape(32, 3072, 8192, 32, 32, 32064, "phi35-tiny", {
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_scaling": _factors(48, "phi35-tiny"), "tie_word_embeddings": False}),
    "phi4": Shape(40, 5120, 17920, 40, 10, 100352, "phi4-mini-tiny", {
        "max_position_embeddings": 16384, "rope_theta": 250000.0, "rope_scaling": None, "partial_rotary_factor": 1.0,
        "original_max_position_embeddings": 16384, "tie_word_embeddings": False, "sliding_window": None}),
    # Phi-4-multimodal-instruct: Phi-4-mini's decoder (32 layers, hidden 3072, 24 heads, 8 KV heads, 200064 rows,
    # tied), a 27-layer SigLIP image encoder and a 24-block speech encoder (4.7B parameters, 9.5 GB: the hub's 5.6B
    # count its vision and speech LoRA adapters, which the native layout does not hold)
    "phi4-multimodal": Multimodal("phi4-multimodal-tiny", {
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
        "num_key_value_heads": 8, "vocab_size": 200064}),
}


def write_checkpoint(directory: Path, shape: Shape | Multimodal, seed: int) -> None:
    """The sharded checkpoint, streamed: random normal weights (std 0.02) and unit norms, as bfloat16 bits."""
    if (directory / "config.json").is_file():
        return  # written before (config.json comes last)
    directory.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    filled = 0
    for name, dims in shape.tensors().items():
        nbytes = 2 * math.prod(dims)
        if groups[-1] and filled + nbytes > SHARD_BYTES:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += nbytes
    rng, tensors, weight_map = np.random.default_rng(seed), shape.tensors(), {}
    for number, names in enumerate(groups, 1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(directory / file, {name: tensors[name] for name in names}, rng)
        weight_map |= dict.fromkeys(names, file)
        print(f"  wrote {file} ({number} of {len(groups)})", flush=True)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * shape.parameters()}, "weight_map": weight_map}, indent=2) + "\n")
    like = EMBEDDED_DIR / shape.like
    for path in like.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, directory / path.name)
    (directory / "config.json").write_text(json.dumps(shape.config_json(), indent=2) + "\n")


@dataclass
class Limited:
    """One command run inside the memory limit."""

    finished: bool
    seconds: float
    max_usage: int  # memory.max_usage_in_bytes: the cgroup's peak, page cache included
    peak_anon: int  # sampled RssAnon of the command
    tail: str  # the last lines it printed, for a failure


def limited(command: list[str], limit: int, name: str) -> Limited:
    """``command`` inside a fresh v1 memory cgroup of ``limit`` bytes (no swap here: over it, the kernel kills)."""
    group = CGROUP / f"phibuild-bench-{os.getpid()}-{name}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        join = f'echo $$ > {group / "cgroup.procs"} && exec "$@"'
        process = run(["sh", "-c", join, "sh", *command], env=ENV, check=False)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        tail = "\n".join(process.output.strip().splitlines()[-5:]) if process.code else ""
        return Limited(process.code == 0, process.seconds, peak, process.peak_anon, tail)
    finally:
        group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "phibuild-bench-fullsize")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKENDS, metavar="BACKEND")
    parser.add_argument("--precisions", nargs="+", default=["int4"], choices=("int4", "int8", "fp16", "fp32"))
    parser.add_argument("--limit-gib", type=float, default=None,
                        help="memory limit (default: 8 GiB for phi35-mini, 16 GiB for phi4)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--no-raw", action="store_true", help="skip the backends' own commands")
    which.add_argument("--raw-only", action="store_true", help="run the backends' own commands only")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for the next run")
    args = parser.parse_args()
    backends = args.backends or installed_backends()
    args.dir.mkdir(parents=True, exist_ok=True)
    # The sources, then one build at a time (each project and raw output is removed once measured): GGUF's F16
    # intermediate is the source's size, an artifact at most the share ARTIFACT of it.
    largest = max(2 * MODELS[m].parameters() for m in args.models)
    needed = sum(2 * MODELS[m].parameters() for m in args.models if not (args.dir / m / "config.json").is_file())
    needed += int(largest * (("gguf" in backends) + max(ARTIFACT[p] for p in args.precisions)))
    free = shutil.disk_usage(args.dir).free
    print(f"Machine: {machine(args.dir)}\nneeds about {size(needed)} free in {args.dir}, has {size(free)}",
          flush=True)
    if free < needed:
        raise SystemExit(f"not enough free space in {args.dir}: {size(free)}, needs about {size(needed)}")
    rows = []
    steps = [(m, b, p) for m in args.models for b in backends for p in args.precisions]
    try:
        for model in args.models:
            shape = MODELS[model]
            source = args.dir / model
            verb = "reusing" if (source / "config.json").is_file() else "writing"
            print(f"{model}: {shape.parameters() / 1e9:.2f}B parameters, {verb} {size(2 * shape.parameters())} "
                  f"in {source}", flush=True)
            write_checkpoint(source, shape, seed=len(model))
            limit = int((args.limit_gib or (16 if model == "phi4" else 8)) * GiB)
            for backend in backends:
                for precision in args.precisions:
                    done = len(rows) + 1
                    target = f"{model}-{precision}-{backend}"
                    print(f"[{done}/{len(steps)}] {target} inside {size(limit)}", flush=True)
                    ours = None
                    if not args.raw_only:
                        print(f"  doit quantize:{target}", flush=True)
                        ours = _ours(args.dir, model, source, backend, precision, limit)
                    raw = None
                    if not args.no_raw:
                        out = args.dir / f"raw-{target}"
                        print(f"  the backend's own command inside {size(limit)}", flush=True)
                        try:
                            raw = limited(raw_command(backend, source, precision, out), limit, f"raw-{target}")
                        finally:
                            for path in (out, Path(f"{out}-cache")):
                                shutil.rmtree(path, ignore_errors=True)
                    rows.append((model, backend, precision, size(limit), ours, raw))
                    print("  " + "; ".join(f"{who}: {_said(said)}" for who, said in (("phibuild", ours), ("raw", raw))
                                           if said), flush=True)
    finally:
        if not args.keep:
            for model in args.models:
                shutil.rmtree(args.dir / model, ignore_errors=True)
    print()
    print(table(["model", "backend", "precision", "limit", "phibuild", "wall", "cgroup peak", "peak RssAnon",
                 "raw command", "raw wall", "raw cgroup peak"],
                [(m, b, p, lim, *_cells(o, anon=True), *_cells(r, anon=False)) for m, b, p, lim, o, r in rows]))
    for m, b, p, _, o, r in rows:
        for who, result in (("phibuild", o), ("raw", r)):
            if result is not None and not result.finished:
                print(f"\n{m}-{p}-{b} ({who}) failed; its last lines:\n{result.tail}")


def _ours(directory: Path, model: str, source: Path, backend: str, precision: str, limit: int) -> Limited:
    """`doit quantize:<target>` in a fresh project (empty store), inside the limit; the project is removed."""
    target = f"{model}-{precision}-{backend}"
    root = Path(tempfile.mkdtemp(prefix=f"project-{target}-", dir=directory))
    try:
        write_project(root, [model], [backend], [precision], local={model: source})
        return limited(doit(root, f"quantize:{target}"), limit, target)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _cells(result: Limited | None, anon: bool) -> tuple[str, ...]:
    if result is None:
        return ("",) * (4 if anon else 3)
    cells = ("finished" if result.finished else "**failed**", secs(result.seconds), size(result.max_usage))
    return (*cells, size(result.peak_anon)) if anon else cells


def _said(result: Limited) -> str:
    return (f"{'finished' if result.finished else 'FAILED'} in {secs(result.seconds)}, cgroup peak "
            f"{size(result.max_usage)}, RssAnon peak {size(result.peak_anon)}")


if __name__ == "__main__":
    main()
