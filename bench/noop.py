"""Benchmarks 2 and 3: deciding that nothing needs rebuilding, against doit's MD5 file_dep check and `dvc status`.

The matrix (embedded models x 4 precisions x installed backends) is built once in a project directory, from copies
of the embedded models (same bytes, so the same cache keys; copies so that `touch` leaves the installed package
alone). Beside it: a generated dodo.py with one task per target (file_dep on the model's files, doit's default MD5
checker, a small target file each) and a dvc.yaml with one stage per target (the same deps, one out each).

2. No-op: each tool run as a user runs it, with nothing changed; phibuild's run is repeated in this process to count
   the bytes it hashed (hashing.bytes_read), and under strace, if installed, to count opens of the weights. A twin
   project configures the catalog's hub models too, as phibuild's defaults do: doit loads their tasks on every
   run, and builds only the embedded copies' (the default targets), from the same store and lock.
3. After `touch` on the weights (content unchanged): each tool's first run after a fresh touch, then a second run.

    python bench/noop.py [--project DIR] [--dvc dvc] [--repeat 5] [--models ...] [--backends ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import (
    BIN,
    best,
    copy_embedded,
    doit,
    doit_in_process,
    installed_backends,
    machine,
    median,
    run,
    secs,
    selection,
    size,
    table,
    timed,
    verdict,
    write_project,
)

from phibuild.backends import PRECISIONS
from phibuild.catalog import HUB
from phibuild.hashing import RACY_SECONDS, RECENT_SECONDS, hash_file
from phibuild.project import Project
from phibuild.sources import source_files

TARGET_NOOP_SECONDS = 0.3
MD5_DODO = '''"""One task per phibuild target, checked by doit itself: file_dep (MD5 checker), a target file."""

from pathlib import Path

TARGETS = {targets}
FILES = {files}
DOIT_CONFIG = {{"dep_file": ".doit.db", "verbosity": 0}}


def write(path):
    Path(path).parent.mkdir(exist_ok=True)
    Path(path).write_text("built\\n")


def task_quantize():
    for name, model in TARGETS.items():
        out = f"out/{{name}}.txt"
        yield {{"name": name, "file_dep": FILES[model], "targets": [out], "actions": [(write, [out])]}}
'''


class Matrix:
    """The built project, its doit-MD5 and DVC twins, and the command that checks each."""

    def __init__(self, root: Path, models: list[str], backends: list[str], dvc: str | None):
        self.root = root
        copies = copy_embedded(models, root / "models")
        write_project(root, models, backends, PRECISIONS, local={name: Path("models") / name for name in models})
        found, _ = Project.load(root).targets()
        self.targets = {target.name: target.model.name for target in found}
        self.files = {name: [str(path) for path in source_files(directory)] for name, directory in copies.items()}
        self.weights = sorted(path for directory in copies.values() for path in directory.glob("*.safetensors"))
        self.commands = {"phibuild: doit": doit(root)}
        self.hub_dir = root / "with-hub"
        write_project(self.hub_dir, [*models, *HUB], backends, PRECISIONS,
                      local={name: Path("..") / "models" / name for name in models},
                      settings={"store": "../.phibuild"})  # its own lock: its sources' paths differ
        listed = len(Project.load(self.hub_dir).targets()[0])
        self.hub_command = f"phibuild: doit, hub models configured too ({listed} targets)"
        self.commands[self.hub_command] = doit(self.hub_dir)
        self.md5_dir = root / "doit-md5"
        self.md5_dir.mkdir(exist_ok=True)
        (self.md5_dir / "dodo.py").write_text(MD5_DODO.format(targets=json.dumps(self.targets, indent=4),
                                                              files=json.dumps(self.files, indent=4)))
        self.md5_options = ["-d", str(self.md5_dir), "-f", str(self.md5_dir / "dodo.py")]
        self.commands["doit: file_dep, MD5 checker"] = [str(BIN / "doit"), *self.md5_options]
        self.dvc, self.dvc_dir = dvc, root / "dvc"
        if dvc:
            self.commands["dvc status"] = [dvc, "status"]

    def build(self) -> None:
        """Build everything once (a no-op when the project was built before)."""
        started = time.perf_counter()
        run(self.commands["phibuild: doit"])
        run(self.commands[self.hub_command])  # restores the same artifacts from the store into its build/
        # doit records a file's new mtime only when its task runs: after a touch (a previous run of this script),
        # every later run would hash it again. Start the twin from a recorded state.
        run([str(BIN / "doit"), "forget", "--all", *self.md5_options])
        run(self.commands["doit: file_dep, MD5 checker"])
        print(f"phibuild matrix and doit twin built or checked in {secs(time.perf_counter() - started)}", flush=True)
        if self.dvc:
            self._dvc_project(self.dvc)

    def _dvc_project(self, dvc: str) -> None:
        """dvc.yaml with one stage per target, initialised and reproduced once."""
        self.dvc_dir.mkdir(exist_ok=True)
        if not (self.dvc_dir / ".dvc").is_dir():
            for command in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"],
                            ["config", "core.check_update", "false"]):
                subprocess.run([dvc, *command], cwd=self.dvc_dir, check=True)
        lines = ["stages:"]
        for name, model in self.targets.items():
            lines += [f"  {name}:", f"    cmd: mkdir -p out && echo built > out/{name}.txt", "    deps:"]
            lines += [f"      - {os.path.relpath(path, self.dvc_dir)}" for path in self.files[model]]
            lines += ["    outs:", f"      - out/{name}.txt"]
        (self.dvc_dir / "dvc.yaml").write_text("\n".join(lines) + "\n")
        run([dvc, "repro", "-q"], cwd=self.dvc_dir)

    def check(self, name: str) -> float:
        """Seconds one run of tool ``name`` takes; it must find nothing to do."""
        process = run(self.commands[name], cwd=self.dvc_dir if name == "dvc status" else None)
        if name == "dvc status" and "up to date" not in process.output:
            raise RuntimeError(f"dvc status found changes:\n{process.output}")
        if name != "dvc status" and "\n.  " in "\n" + process.output:  # doit marks a task it runs with ".  "
            raise RuntimeError(f"{name} rebuilt something:\n{process.output}")
        return process.seconds

    def touch(self) -> None:
        """`touch` every weights file: a new mtime, the same bytes."""
        now = time.time_ns()
        for path in self.weights:
            os.utime(path, ns=(now, now))


def weight_opens(matrix: Matrix, touch: bool = False) -> str:
    """How many times a `doit` run (right after a touch, if asked) opens a weights file, counted by strace;
    "" without strace."""
    if not shutil.which("strace"):
        return ""
    if touch:
        matrix.touch()
    with tempfile.NamedTemporaryFile(suffix=".strace") as log:
        process = subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", log.name,
                                  *matrix.commands["phibuild: doit"]], capture_output=True, text=True)
        if process.returncode != 0:
            return f"strace failed: {process.stderr.strip()[:200]}"
        opens = [line for line in Path(log.name).read_text().splitlines() if ".safetensors" in line]
    return f"{len(opens)} opens of a weights file (strace -e openat)"


def noop(matrix: Matrix, repeat: int) -> list[str]:
    """Benchmark 2. Returns the verdict lines."""
    for name in matrix.commands:  # once each, untimed: every tool's state is recorded and files are cached
        matrix.check(name)
    python = str(BIN / "python")
    floor = {"python -c pass": [python, "-c", "pass"],
             "python -c 'import doit, phibuild.tasks'": [python, "-c", "import doit, phibuild.tasks"]}
    times: dict[str, list[float]] = {name: [] for name in [*matrix.commands, *floor]}
    for _ in range(repeat):
        for name in matrix.commands:
            times[name].append(matrix.check(name))
        for name, command in floor.items():
            times[name].append(run(command).seconds)
    code, read, _ = doit_in_process(matrix.root)  # the first in-process run pays for imports
    in_process = [doit_in_process(matrix.root) for _ in range(repeat)]
    if code or any(result[0] for result in in_process):
        raise RuntimeError("in-process doit failed")
    ours = median(times["phibuild: doit"])
    rows = [(name, secs(median(samples)), secs(best(samples)), f"{median(samples) / ours:.2f}x")
            for name, samples in times.items()]
    rows.append(("phibuild: the same doit run in-process (no start-up, no imports)",
                 secs(median([r[2] for r in in_process])), secs(best([r[2] for r in in_process])),
                 f"{median([r[2] for r in in_process]) / ours:.2f}x"))
    print(f"\n### No-op: {len(matrix.targets)} targets, nothing changed\n")
    print(table(["command", f"median of {repeat}", "best", "time / phibuild's"], rows))
    read_total = read + sum(result[1] for result in in_process)
    opens = weight_opens(matrix)
    print(f"\nweight bytes phibuild hashed in {repeat + 1} in-process no-op runs: {read_total}"
          + (f"; a no-op `doit` subprocess: {opens}" if opens else ""))
    return [f"no-op: phibuild {secs(ours)} median wall (target < {TARGET_NOOP_SECONDS} s: "
            f"{verdict(ours < TARGET_NOOP_SECONDS)}), best {secs(best(times['phibuild: doit']))}; "
            f"{read_total} weight bytes hashed (target 0: {verdict(read_total == 0)})"]


def touched(matrix: Matrix, repeat: int) -> list[str]:
    """Benchmark 3. Returns the verdict lines."""
    total = sum(path.stat().st_size for path in matrix.weights)
    xxh3 = best([sum(timed(lambda p=path: hash_file(p)) for path in matrix.weights) for _ in range(repeat)])
    first: dict[str, list[float]] = {name: [] for name in matrix.commands}
    second: dict[str, list[float]] = {name: [] for name in matrix.commands}
    for _ in range(repeat):
        for name in matrix.commands:
            matrix.touch()
            first[name].append(matrix.check(name))
            second[name].append(matrix.check(name))
    ours = median(first["phibuild: doit"])
    rows = [(name, secs(median(first[name])), f"{median(first[name]) / ours:.2f}x", secs(median(second[name])))
            for name in matrix.commands]
    print(f"\n### After `touch` on the weights ({len(matrix.weights)} files, {size(total)}), content unchanged\n")
    print(table(["command", f"first run after the touch (median of {repeat})", "time / phibuild's",
                 "second run, not touched again"], rows))

    opens = weight_opens(matrix, touch=True)
    if opens:
        print(f"\na `doit` subprocess right after a touch: {opens}, for {len(matrix.weights)} weights files")

    # In this process: the bytes phibuild hashes right after a touch, once the touch is RECENT_SECONDS old (the
    # digest is remembered for the run) and once it is RACY_SECONDS old (persisted in the stat cache).
    baseline = median([doit_in_process(matrix.root)[2] for _ in range(repeat)])
    results = {}
    waits = (("right after the touch", 0.0), (f"{RECENT_SECONDS + 0.1:g} s after the touch", RECENT_SECONDS + 0.1),
             (f"{RACY_SECONDS:g} s after the touch", RACY_SECONDS + 0.1))
    for label, wait in waits:
        samples = []
        for _ in range(repeat):
            matrix.touch()
            time.sleep(wait)
            samples.append(doit_in_process(matrix.root))
        results[label] = (max(s[1] for s in samples), median([s[2] for s in samples]) - baseline)
    rows = [(label, f"{read} ({read / total:.1f} x the touched size)", secs(extra), f"{extra / xxh3:.1f}x")
            for label, (read, extra) in results.items()]
    print(f"\none xxh3 pass over the touched files: {secs(xxh3)} (best of {repeat}); in-process no-op: "
          f"{secs(baseline)} (median)\n")
    print(table(["phibuild in-process, run", "bytes hashed (most of any run)", "time over the no-op (median)",
                 "over one xxh3 pass"], rows))
    verdicts = []
    for label, (read, extra) in results.items():
        once = read == total
        verdicts.append(f"touch, phibuild run {label}: read {read / total:.1f} x the touched bytes (target exactly "
                        f"once: {verdict(once)}), {secs(extra)} over the no-op against {secs(xxh3)} for one xxh3 "
                        f"pass ({verdict(once and extra <= 2 * xxh3 + 0.01)}, allowing 2x + 10 ms of noise)")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=None,
                        help="project directory, kept and reused (default: a temporary one, deleted at the end)")
    parser.add_argument("--dvc", default="dvc", help="the dvc executable (default: dvc on PATH)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (default 5)")
    selection(parser)
    args = parser.parse_args()

    dvc = shutil.which(args.dvc)
    root = args.project.resolve() if args.project else Path(tempfile.mkdtemp(prefix="phibuild-bench-noop-"))
    try:
        print(f"Machine: {machine(root)}")
        if not dvc:
            print(f"no {args.dvc!r} found: the DVC rows are left out (pip install dvc, or pass --dvc PATH)")
        else:
            version = subprocess.run([dvc, "--version"], capture_output=True, text=True).stdout.strip()
            print(f"DVC {version} ({dvc})")
        matrix = Matrix(root, args.models, args.backends or installed_backends(), dvc)
        print(f"project {root}: {len(matrix.targets)} targets", flush=True)
        matrix.build()
        verdicts = noop(matrix, args.repeat) + touched(matrix, args.repeat)
        print("\n" + "\n".join(verdicts))
    finally:
        if args.project is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
