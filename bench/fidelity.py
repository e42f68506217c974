"""Benchmark 7: what measuring fidelity costs, against what building costs, over the embedded matrix.

In a fresh project with an empty store, each a fresh `doit` process: `doit quantize` (every target's build and
smoke check), then `doit fidelity` (one reference per model, one measurement per artifact), then `doit fidelity`
again, which must measure nothing. Prints the two wall times and their ratio (the target: measuring the matrix
takes at most as long as building it), the evaluation time per backend (each artifact's tokens at its prefill
speed, from the lock) and how many tokens each measurement used.

    python bench/fidelity.py [--dir /tmp] [--models ...] [--backends ...] [--eval-windows 2] [--eval-length 1024]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchlib import doit, installed_backends, machine, run, secs, selection, table, verdict, write_project

from phibuild.backends import PRECISIONS
from phibuild.lockfile import Lockfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the project goes")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--eval-length", type=int, default=1024)
    selection(parser)
    args = parser.parse_args()
    backends = args.backends or installed_backends()
    root = args.dir / "phibuild-bench-fidelity"
    shutil.rmtree(root, ignore_errors=True)
    write_project(root, args.models, backends, PRECISIONS,
                  settings={"eval_windows": args.eval_windows, "eval_length": args.eval_length})
    print(machine(root.parent))
    build = run(doit(root, "quantize"))
    measure = run(doit(root, "fidelity"))
    again = run(doit(root, "fidelity"))
    measured_again = again.output.count("phibuild: measuring") + again.output.count("phibuild: computing")

    records = {name: entry.fidelity for name, entry in Lockfile(root / "artifacts.lock").read().artifacts.items()}
    spent: dict[str, list[float]] = {}
    tokens = set()
    for name, record in records.items():
        if record is not None and record.not_run is None:
            spent.setdefault(name.rsplit("-", 1)[1], []).append(record.tokens / record.prefill_tps)
            tokens.add(record.tokens)
    print(table(["backend", "artifacts measured", "evaluation time"],
                [(backend, len(times), secs(sum(times))) for backend, times in sorted(spent.items())]))
    print(f"\n{len(records)} artifacts, {sum(len(t) for t in spent.values())} measured over {sorted(tokens)} tokens "
          f"each; {sum(1 for r in records.values() if r is not None and r.not_run)} cannot run here\n")
    ratio = measure.seconds / build.seconds
    print(table(["step", "wall time", "ratio to the build"],
                [("doit quantize (fresh store)", secs(build.seconds), "1.00"),
                 ("doit fidelity (references and measurements)", secs(measure.seconds), f"{ratio:.2f}"),
                 ("doit fidelity again (no-op)", secs(again.seconds), f"{again.seconds / build.seconds:.3f}")]))
    print(f"\nmeasuring within the build's time: {verdict(ratio <= 1.0)}; "
          f"the no-op measured {measured_again} things: {verdict(measured_again == 0)}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
