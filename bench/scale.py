"""Benchmark 6: peak memory and time of each backend's int4 build at Phi-3.5-mini's real width, per layer.

A synthetic checkpoint with Phi-3.5-mini-instruct's shape (hidden 3072, intermediate 8192, 32 heads, vocab rows
32064, longrope with 48 short and 48 long factors, original context 4096, max 131072) but only a few layers, with
random bfloat16 weights, is built once per layer count. phi35-tiny's tokenizer files are reused: like the real
model's, its tokens are fewer than the embedding rows. Measured per layer count, then per layer (the slope between
the counts) and extrapolated to the real 32 layers:

- our GGUF converter alone (HF to F16 GGUF), in its own process (best time and highest peak of 3 runs);
- each backend's int4 target, `doit quantize:…` in a fresh project (its smoke check included, timed apart);
- beside it the backend's own command for the same build (see benchlib.raw_command).

Peak memory is VmHWM, the high-water mark of each command's resident pages, including pages of memory-mapped
files (llama.cpp maps the GGUF); RssAnon, sampled alongside every 20 ms, leaves those out (see benchlib.run).

    python bench/scale.py [--dir DIR] [--layers 1 2 4] [--backends ...] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from benchlib import (
    BACKENDS,
    BIN,
    installed_backends,
    machine,
    raw_build,
    run,
    secs,
    size,
    table,
    timed_doit,
    verdict,
    write_project,
    write_safetensors,
)

from phibuild.catalog import EMBEDDED_DIR

REAL_LAYERS = 32
HIDDEN, INTERMEDIATE, VOCAB, HEADS = 3072, 8192, 32064, 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")
CONVERT = ("import sys; from pathlib import Path; from phibuild.backends.gguf.convert import convert; "
           "convert(Path(sys.argv[1]), Path(sys.argv[2]), 'f16')")
# what the converter imports, converting nothing
IMPORTS = "import gguf, numpy, sentencepiece, phibuild.backends.gguf.convert"


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Phi-3's tensor names and shapes (fused qkv and gate_up, separate embeddings)."""
    tensors: dict[str, tuple[int, ...]] = {"lm_head.weight": (VOCAB, HIDDEN),
                                           "model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        tensors |= {
            prefix + "input_layernorm.weight": (HIDDEN,),
            prefix + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            prefix + "mlp.gate_up_proj.weight": (2 * INTERMEDIATE, HIDDEN),
            prefix + "post_attention_layernorm.weight": (HIDDEN,),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            prefix + "self_attn.qkv_proj.weight": (3 * HIDDEN, HIDDEN),
        }
    tensors["model.norm.weight"] = (HIDDEN,)
    return tensors


def parameters(layers: int) -> int:
    return sum(math.prod(shape) for shape in shapes(layers).values())


def config(layers: int) -> dict:
    """phi35-tiny's config.json at Phi-3.5-mini's width, with 48 longrope factors resampled from its 32."""
    base = json.loads((EMBEDDED_DIR / "phi35-tiny" / "config.json").read_text())
    head_half = HIDDEN // HEADS // 2
    rope = base["rope_scaling"]
    for key in ("long_factor", "short_factor"):
        old = np.array(rope[key])
        rope[key] = np.interp(np.linspace(0, len(old) - 1, head_half), np.arange(len(old)), old).tolist()
    return base | {"hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS,
                   "num_key_value_heads": HEADS, "num_hidden_layers": layers, "vocab_size": VOCAB,
                   "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                   "rope_scaling": rope}


def make_checkpoint(directory: Path, layers: int) -> None:
    """Write the checkpoint, streaming: random normal weights (std 0.02) and unit norms, as bfloat16 bits."""
    if (directory / "config.json").is_file():
        return  # made before (written last)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", shapes(layers), np.random.default_rng(layers))
    for name in TOKENIZER_FILES:
        shutil.copy(EMBEDDED_DIR / "phi35-tiny" / name, directory / name)
    (directory / "config.json").write_text(json.dumps(config(layers), indent=2) + "\n")


def per_layer(values: dict[int, float]) -> tuple[float, float]:
    """(slope per layer between the smallest and largest counts, value extrapolated from the largest count to the
    real layer count). A negative slope is noise around a constant (a peak set by one tensor): it counts as 0."""
    low, high = min(values), max(values)
    slope = max(0.0, (values[high] - values[low]) / (high - low))
    return slope, values[high] + (REAL_LAYERS - high) * slope


@dataclass
class Measured:
    """One build at one layer count."""

    wall: float
    peak_rss: int
    anon: int
    build: float = 0.0  # the backend's own steps, timed inside phibuild's process
    smoke: float = 0.0
    raw_wall: float = 0.0  # the backend's own command, run alone
    raw_peak_rss: int = 0


def measure(checkpoint: Path, backend: str, work: Path) -> Measured:
    """phibuild's int4 build of ``checkpoint`` in a fresh project, and the backend's own command beside it."""
    root = Path(tempfile.mkdtemp(prefix=f"project-{backend}-", dir=work))
    try:
        write_project(root, ["phi35-width"], [backend], ["int4"], local={"phi35-width": checkpoint})
        build = timed_doit(root, f"quantize:phi35-width-int4-{backend}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raw = raw_build(backend, checkpoint, "int4", work / f"raw-{backend}")
    return Measured(build.process.seconds, build.process.peak_rss, build.process.peak_anon, sum(build.builds),
                    sum(build.smokes), raw.seconds, raw.peak_rss)


def maybe(show: Callable[[float], str], value: float) -> str:
    """A table cell: empty where there is nothing to show (the converter has no smoke check, no raw twin)."""
    return show(value) if value else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "phibuild-bench-scale",
                        help="where the checkpoints and projects go (default: phibuild-bench-scale in the temp dir)")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="layer counts (default 1 2)")
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKENDS, metavar="BACKEND",
                        help="backends (default: every installed one)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for the next run")
    args = parser.parse_args()
    counts = sorted(set(args.layers))
    if len(counts) < 2:
        parser.error("--layers needs two different counts at least, for the per-layer slope")

    backend_names = args.backends or installed_backends()
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"Machine: {machine(args.dir)}", flush=True)
    python = str(BIN / "python")
    imports = run([python, "-c", IMPORTS])
    results: dict[str, dict[int, Measured]] = {name: {} for name in ["converter", *backend_names]}
    try:
        for layers in counts:
            checkpoint = args.dir / f"phi35-width-{layers}-layers"
            make_checkpoint(checkpoint, layers)
            print(f"{layers} layers: checkpoint {size(2 * parameters(layers))}", flush=True)
            runs = [run([python, "-c", CONVERT, checkpoint, args.dir / "converted.gguf"]) for _ in range(3)]
            (args.dir / "converted.gguf").unlink()
            results["converter"][layers] = Measured(min(r.seconds for r in runs), max(r.peak_rss for r in runs),
                                                    max(r.peak_anon for r in runs))
            for name in backend_names:
                results[name][layers] = measure(checkpoint, name, args.dir)
                print(f"  {name}: {secs(results[name][layers].wall)}", flush=True)
    finally:
        if not args.keep:
            for path in args.dir.glob("phi35-width-*-layers"):
                shutil.rmtree(path)

    print(f"\n### Phi-3.5-mini width, int4, {', '.join(map(str, counts))} layers\n")
    rows = []
    for name, measured in results.items():
        label = "our GGUF converter alone (to F16)" if name == "converter" else f"phibuild {name}"
        for layers, m in measured.items():
            rows.append((label, layers, secs(m.wall), maybe(secs, m.build), maybe(secs, m.smoke), size(m.peak_rss),
                         size(m.anon), maybe(secs, m.raw_wall), maybe(size, m.raw_peak_rss)))
    print(table(["build", "layers", "wall", "backend steps in it", "smoke check in it", "peak RSS (VmHWM)",
                 "peak RssAnon (sampled)", "raw command wall", "raw command peak RSS"], rows))

    print(f"\n### Per layer (slope between {counts[0]} and {counts[-1]} layers) and extrapolated to {REAL_LAYERS}\n")
    rows = []
    for name, measured in results.items():
        label = "our GGUF converter alone (to F16)" if name == "converter" else f"phibuild {name}"
        wall_slope, wall_real = per_layer({n: m.wall for n, m in measured.items()})
        rss_slope, rss_real = per_layer({n: m.peak_rss for n, m in measured.items()})
        smoke_real = per_layer({n: m.smoke for n, m in measured.items()})[1]
        raw_real = per_layer({n: m.raw_peak_rss for n, m in measured.items()})[1]
        rows.append((label, secs(wall_slope), secs(wall_real), maybe(secs, smoke_real), size(rss_slope),
                     size(rss_real), maybe(size, raw_real)))
    print(table(["build", "wall per layer", f"wall at {REAL_LAYERS}", f"of which smoke at {REAL_LAYERS}",
                 "peak RSS per layer", f"peak RSS at {REAL_LAYERS}", f"raw command peak RSS at {REAL_LAYERS}"], rows))

    print(f"\nPython with only the converter's imports: peak RSS {size(imports.peak_rss)}")
    converter = {n: m.peak_rss for n, m in results["converter"].items()}
    converter[REAL_LAYERS] = per_layer(converter)[1]
    for layers, peak in converter.items():
        f16 = 2 * parameters(layers)
        how = "extrapolated" if layers == REAL_LAYERS else "measured"
        print(f"converter at {layers} layers ({how}): peak RSS {size(peak)} = {peak / f16:.2f} of the F16 size "
              f"{size(f16)} (target < 0.25: {verdict(peak < f16 / 4)})")


if __name__ == "__main__":
    main()
