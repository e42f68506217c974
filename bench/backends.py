"""Benchmark 5: phibuild's overhead over each backend's own command, and the whole matrix against those commands.

Raw commands, each a fresh process, with the options phibuild passes (from the backends' default parameters):
ONNX Runtime GenAI's builder CLI, optimum-cli export openvino, mlx_lm.convert, and for GGUF our converter plus
llama.cpp's quantizer in one Python process. phibuild: `doit quantize:<target>` in a fresh project with an empty
store, run through a wrapper that times each backend's build and smoke check inside that same doit process.

1. One target per backend (phi35-tiny int4): phibuild's wall time over the raw command's (median of --repeat).
2. The whole matrix by one `doit` run (fresh store) against the raw commands run one after another.

    python bench/backends.py [--repeat 3] [--single phi35-tiny] [--models ...] [--backends ...] [--no-matrix]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchlib import (
    installed_backends,
    machine,
    median,
    raw_build,
    secs,
    selection,
    table,
    timed_doit,
    verdict,
    write_project,
)

from phibuild.backends import PRECISIONS
from phibuild.catalog import EMBEDDED_DIR


def run_raw(backend: str, model: str, precision: str, scratch: Path) -> float:
    return raw_build(backend, EMBEDDED_DIR / model, precision, scratch / f"raw-{model}-{precision}-{backend}").seconds


def run_phibuild(models: list[str], backends_: list[str], precisions: list[str], scratch: Path,
                 *tasks: str) -> tuple[float, float, float, int]:
    """`doit TASKS` in a fresh project: (wall seconds, of which backend builds, of which smoke checks, builds)."""
    root = Path(tempfile.mkdtemp(prefix="project-", dir=scratch))
    try:
        write_project(root, models, backends_, precisions)
        build = timed_doit(root, *tasks)
        return build.process.seconds, sum(build.builds), sum(build.smokes), len(build.builds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def single(model: str, backend_names: list[str], repeat: int, scratch: Path) -> None:
    """Part 1: one int4 target per backend."""
    results: dict[str, dict[str, list[float]]] = {
        name: {"raw": [], "phibuild": [], "build": [], "smoke": []} for name in backend_names}
    for _ in range(repeat):
        for name in backend_names:
            results[name]["raw"].append(run_raw(name, model, "int4", scratch))
            wall, build, smoke, _ = run_phibuild([model], [name], ["int4"], scratch, f"quantize:{model}-int4-{name}")
            for key, value in (("phibuild", wall), ("build", build), ("smoke", smoke)):
                results[name][key].append(value)
            print(f"{name}: raw {secs(results[name]['raw'][-1])}, phibuild {secs(wall)}", flush=True)
    rows = []
    for name, times in results.items():
        raw, ours, build, smoke = (median(times[key]) for key in ("raw", "phibuild", "build", "smoke"))
        rows.append((name, secs(raw), secs(ours), f"{ours / raw:.2f}x", secs(build), secs(smoke),
                     f"{(ours - smoke) / raw:.2f}x"))
    print(f"\n### One target per backend: {model} int4, fresh project and empty store (median of {repeat})\n")
    print(table(["backend", "raw command", "phibuild: doit quantize:…", "phibuild / raw",
                 "of which the backend's build", "of which the smoke check", "phibuild without smoke / raw"], rows))


def matrix(models: list[str], backend_names: list[str], scratch: Path) -> str:
    """Part 2: every target by one doit run, against the raw commands one after another. Returns the verdict."""
    raw = 0.0
    for model in models:
        for name in backend_names:
            for precision in PRECISIONS:
                raw += run_raw(name, model, precision, scratch)
    print(f"raw commands: {secs(raw)}", flush=True)
    wall, build, smoke, builds = run_phibuild(models, backend_names, list(PRECISIONS), scratch)
    targets = len(models) * len(backend_names) * len(PRECISIONS)
    print(f"\n### The whole matrix: {targets} targets ({', '.join(models)} x {', '.join(PRECISIONS)} x "
          f"{', '.join(backend_names)})\n")
    print(table(["", "wall", "phibuild / raw"], [
        (f"raw commands, one process each, one after another ({targets})", secs(raw), "1.00x"),
        (f"phibuild: one `doit` run, fresh store ({builds} backend build steps, smoke checks included)", secs(wall),
         f"{wall / raw:.2f}x"),
        ("… of which the backends' builds, in that process", secs(build), f"{build / raw:.2f}x"),
        ("… of which the smoke checks", secs(smoke), f"{smoke / raw:.2f}x"),
        ("phibuild without its smoke checks", secs(wall - smoke), f"{(wall - smoke) / raw:.2f}x"),
    ]))
    return (f"whole matrix: phibuild {secs(wall)} against {secs(raw)} raw, {wall / raw:.2f}x "
            f"(target: phibuild faster: {verdict(wall < raw)}); without smoke checks {(wall - smoke) / raw:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where outputs and projects go (default: the temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per single-target measurement (default 3)")
    parser.add_argument("--single", default="phi35-tiny", help="model of the single-target runs")
    parser.add_argument("--no-matrix", action="store_true", help="skip the whole-matrix comparison")
    selection(parser)
    args = parser.parse_args()

    backend_names = args.backends or installed_backends()
    args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="phibuild-bench-backends-", dir=args.dir))
    try:
        print(f"Machine: {machine(scratch)}", flush=True)
        single(args.single, backend_names, args.repeat, scratch)
        if not args.no_matrix:
            print("\n" + matrix(args.models, backend_names, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
