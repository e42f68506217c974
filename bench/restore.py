"""Benchmark 4: showing a stored artifact again after its visible copy was deleted, against copying its bytes.

Store.link_visible reflinks or hardlinks each file of a store entry into build/<target>/, so its cost should not
depend on the artifact's size; shutil.copytree is what a cache without links does. One synthetic entry per size:
a weights file of random bytes (named like ONNX external data) and a small config. The ONNX backend's readers
refuse hardlinked external data, so its `*.onnx.data` files are shown as copies where reflinks are unavailable:
that case is measured too.

    python bench/restore.py [--dir DIR] [--sizes-mib 64 512 2048] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from benchlib import MiB, filesystem, machine, median, quiet, rounds, secs, size, table, verdict

from phibuild.backends.onnx import OnnxBackend
from phibuild.hashing import CHUNK, digest_files, digest_json
from phibuild.store import Entry, Store

WEIGHTS = "model.onnx.data"
CONSTANT_WITHIN = 1.5  # largest over smallest artifact: "constant" allows this much noise


def make_entry(store: Store, total: int) -> Entry:
    """A published store entry holding ``total`` bytes of random weights and a small config."""
    build = store.new_build_dir()
    artifact = build / "artifact"
    artifact.mkdir()
    rng = np.random.default_rng(total)
    with open(artifact / WEIGHTS, "wb") as handle:
        for done in range(0, total, CHUNK):
            handle.write(rng.bytes(min(CHUNK, total - done)))
    (artifact / "genai_config.json").write_text('{"model": {"type": "phi3"}}\n')
    files = quiet(lambda: digest_files(artifact))()  # quiet: its progress bar
    key = digest_json(files)
    return store.publish(build, key, {"key": key, "target": f"synthetic-{total}", "files": files})


def contenders(store: Store, entry: Entry, scratch: Path) -> dict[str, Callable[[], object]]:
    return {
        "Store.link_visible (hardlink)": lambda: store.link_visible(entry, scratch / "linked"),
        "Store.link_visible, ONNX's *.onnx.data unlinkable":
            lambda: store.link_visible(entry, scratch / "onnx", OnnxBackend.unlinkable),
        "shutil.copytree": lambda: shutil.copytree(entry.artifact, scratch / "copied"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the synthetic store goes (default: the temp dir)")
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 512, 2048], help="artifact sizes in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="runs per contender and size (default 5)")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="phibuild-bench-restore-", dir=args.dir))
    print(f"Machine: {machine(scratch)}")
    store = Store(scratch / "store")
    results: dict[int, dict[str, float]] = {}
    how = ""
    try:
        for mib in sorted(args.sizes_mib):
            entry = make_entry(store, mib * MiB)
            shown = contenders(store, entry, scratch)

            def delete_visible() -> None:
                for name in ("linked", "onnx", "copied"):
                    shutil.rmtree(scratch / name, ignore_errors=True)

            times = rounds(shown, args.repeat, before=delete_visible)
            results[mib] = {name: median(samples) for name, samples in times.items()}
            delete_visible()
            how = store.link_visible(entry, scratch / "linked")
            store.remove(entry.key)
            print(f"{size(mib * MiB)} done", flush=True)
    finally:
        store.statcache.close()
        shutil.rmtree(scratch)

    names = list(next(iter(results.values())))
    rows = [(size(mib * MiB), *(secs(times[name]) for name in names),
             f"{times[names[2]] / times[names[0]]:.0f}x") for mib, times in results.items()]
    print(f"\n### Restoring a deleted visible copy ({filesystem(args.dir)}: link_visible used {how}), "
          f"median of {args.repeat}\n")
    print(table(["artifact", *names, "copytree / link_visible"], rows))
    smallest, largest = results[min(results)], results[max(results)]
    print()
    for name in names:
        growth = largest[name] / smallest[name]
        target = (f"target constant, within {CONSTANT_WITHIN}x: {verdict(growth <= CONSTANT_WITHIN)}"
                  if name.startswith("Store") else "the baseline")
        print(f"{name}: {size(max(results) * MiB)} takes {growth:.1f}x the time of {size(min(results) * MiB)} "
              f"({target})")


if __name__ == "__main__":
    main()
