"""What the benchmark scripts share: timing side by side, a subprocess's peak memory, phibuild projects, the machine.

Every figure a script prints is a ratio against a baseline measured in the same run, because another job may be
loading the machine: absolute seconds from two different runs are not comparable, their ratios mostly are.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from phibuild.backends import MODULES
from phibuild.catalog import EMBEDDED_TEXT

BIN = Path(sys.executable).parent  # doit, optimum-cli, mlx_lm.convert: from the environment running the bench
BACKENDS = tuple(MODULES)
PACKAGES = ("doit", "xxhash", "onnxruntime-genai", "onnxruntime", "openvino", "nncf", "optimum-intel", "mlx",
            "mlx-lm", "llama_cpp_python", "gguf", "torch", "transformers", "numpy")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # nothing may wait on the network
DODO = ("from phibuild.tasks import dodo_config, task_fidelity, task_quantize, task_report  # noqa: F401\n\n"
        "DOIT_CONFIG = dodo_config()\n")
MiB = 2**20
ROWS_AT_ONCE = 4096  # rows of random weights made at a time (write_safetensors)
GiB = 2**30


# -- timing ------------------------------------------------------------------------------------------


def timed(function: Callable[[], object]) -> float:
    """Seconds ``function()`` took, on the monotonic clock."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def rounds(contenders: dict[str, Callable[[], object]], repeat: int,
           before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Time each contender ``repeat`` times, interleaved (A B C, A B C, ...), so that a load that comes and goes
    hits them alike; ``before`` runs untimed before each measurement (dropping caches, touching files)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, function in contenders.items():
            if before is not None:
                before()
            times[name].append(timed(function))
    return times


def best(samples: Sequence[float]) -> float:
    """The least disturbed of several runs: other load only ever adds time."""
    return min(samples)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


@dataclass
class Process:
    """A finished subprocess: wall time, peak memory and what it printed."""

    code: int
    seconds: float
    peak_rss: int  # bytes: VmHWM, the high-water mark of the command's resident pages, mapped files included
    peak_anon: int  # bytes: highest RssAnon seen by sampling /proc every 20 ms (heap, no file-backed pages)
    output: str


def run(command: Sequence[str | Path], cwd: Path | None = None, env: dict[str, str] | None = None,
        check: bool = True) -> Process:
    """Run ``command`` and report its wall time and peak memory; fail if it fails (unless not ``check``).

    Peak memory is VmHWM from /proc, sampled every 20 ms until the command exits: the high-water mark of its own
    address space since exec, mapped file pages included (RssAnon, sampled alongside, leaves them out). Not
    ``ru_maxrss``: the kernel starts a spawned child's maxrss at its parent's high-water mark, so a benchmark
    that has just written a checkpoint would lend its own size to every command it runs. The command's
    descendants are summed with it: phibuild builds in worker processes.
    """
    output = io.BytesIO()
    start = time.perf_counter()
    child = subprocess.Popen([str(part) for part in command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    peak, done = [0, 0], threading.Event()  # VmHWM, RssAnon
    reader = threading.Thread(target=lambda: shutil.copyfileobj(child.stdout, output))
    sampler = threading.Thread(target=_sample_memory, args=(child.pid, peak, done), daemon=True)
    reader.start()
    sampler.start()
    _, status, _ = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    reader.join()
    text = output.getvalue().decode(errors="replace")
    if check and child.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} exited with {child.returncode}:\n{text[-4000:]}")
    return Process(child.returncode, seconds, peak[0], peak[1], text)


def _sample_memory(pid: int, peak: list[int], done: threading.Event) -> None:
    """Keep ``peak`` at the highest VmHWM and RssAnon of ``pid`` and its descendants (phibuild's workers, a
    toolchain's own subprocesses), summed over the processes alive at each sample; a zombie has neither."""
    while not done.is_set():
        totals = [0, 0]
        for member in [pid, *_descendants(pid)]:
            try:
                text = Path(f"/proc/{member}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            for slot, name in enumerate(("VmHWM", "RssAnon")):
                if name in fields:
                    totals[slot] += int(fields[name].split()[0]) * 1024
        if not totals[0] and not _alive(pid):
            return
        peak[0], peak[1] = max(peak[0], totals[0]), max(peak[1], totals[1])
        done.wait(0.02)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, found by walking /proc's parent links."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def drop_caches() -> bool:
    """Empty the page cache (root only), so the next read comes from the disk; False when not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def quiet(function: Callable[[], object]) -> Callable[[], object]:
    """``function`` with its stdout and stderr (progress bars, logs) swallowed."""
    def silent() -> object:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return function()
    return silent


# -- phibuild projects -----------------------------------------------------------------------------------


def write_project(root: Path, models: Sequence[str], backends: Sequence[str], precisions: Sequence[str],
                  local: dict[str, Path] | None = None, settings: dict[str, str] | None = None) -> Path:
    """A project directory (``pyproject.toml`` and ``dodo.py``) building these models, backends and precisions.

    ``local`` maps model names to checkpoint directories; an embedded model's name may be mapped to a copy of
    its files, which has the same content and hence the same cache keys, and can be touched without touching
    the installed package. ``settings``: more ``[tool.phibuild]`` keys (a shared ``store``, say).
    """
    root.mkdir(parents=True, exist_ok=True)
    text = (f"[tool.phibuild]\nmodels = {json.dumps(list(models))}\nbackends = {json.dumps(list(backends))}\n"
            f"precisions = {json.dumps(list(precisions))}\n")
    text += "".join(f"{key} = {json.dumps(value)}\n" for key, value in (settings or {}).items())
    for name, path in (local or {}).items():
        text += f"\n[tool.phibuild.model.{name}]\npath = {json.dumps(str(path))}\n"
    (root / "pyproject.toml").write_text(text)
    (root / "dodo.py").write_text(DODO)
    return root


def write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]], rng) -> None:
    """A bfloat16 safetensors file of ``tensors`` (name: shape), streamed a few thousand rows at a time: random
    normal weights (std 0.02) and, for 1-D and 0-D tensors (norm weights, scales), ones, as in a real checkpoint.
    A tensor of more dimensions (a convolution's) is written as rows of its trailing ones."""
    import numpy as np

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors.items():
        end = offset + 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for shape in tensors.values():
            if len(shape) <= 1:
                handle.write(np.full(shape, 0x3F80, np.uint16).tobytes())
                continue
            width = math.prod(shape[1:])
            for start in range(0, shape[0], ROWS_AT_ONCE):
                rows = rng.standard_normal((min(ROWS_AT_ONCE, shape[0] - start), width), np.float32) * 0.02
                handle.write((rows.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def copy_embedded(names: Sequence[str], directory: Path) -> dict[str, Path]:
    """Copies of embedded models under ``directory`` (kept if already there), by name."""
    from phibuild.catalog import EMBEDDED_DIR

    copies = {}
    for name in names:
        copies[name] = directory / name
        if not copies[name].is_dir():
            shutil.copytree(EMBEDDED_DIR / name, copies[name])
    return copies


def doit(root: Path, *args: str) -> list[str]:
    """The command line of ``doit ARGS`` in ``root``, as a user types it."""
    return [str(BIN / "doit"), "-d", str(root), "-f", str(root / "dodo.py"), *args]


def doit_in_process(root: Path, *args: str) -> tuple[int, int, float]:
    """``doit ARGS`` in this process (``phibuild.tasks.run``, as the tests do): (exit code, bytes phibuild hashed,
    seconds). phibuild counts every byte it reads to hash in ``hashing.bytes_read``."""
    from phibuild import hashing, tasks

    before = hashing.bytes_read
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = tasks.run(root, *args)
    seconds = time.perf_counter() - start
    tasks.forget_projects()
    return code, hashing.bytes_read - before, seconds


# `doit ARGS` as the doit script runs it, with each backend's build steps and smoke check timed from inside.
TIMED_DOIT = """import functools, sys, time
from doit.doit_cmd import DoitMain
from phibuild import backends

def timed(method, what):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            print(f"bench: {what} {time.perf_counter() - start:.3f} s", flush=True)
    return wrapper

for name in backends.MODULES:
    cls = type(backends.get(name))
    cls.smoke = timed(cls.smoke, "smoke")
    for step in ("build", "build_intermediate"):
        if step in vars(cls):
            setattr(cls, step, timed(getattr(cls, step), "build"))
sys.exit(DoitMain().run(sys.argv[1:]))
"""
STEP = re.compile(r"^bench: (build|smoke) ([0-9.]+) s$", re.MULTILINE)


@dataclass
class TimedBuild:
    """A `doit` run with the seconds of each backend build step and smoke check it ran, timed inside it."""

    process: Process
    builds: list[float]
    smokes: list[float]


def timed_doit(root: Path, *args: str) -> TimedBuild:
    """``doit ARGS`` in ``root`` in a subprocess (wall time, peak memory), through a wrapper that prints how long
    each backend build step and smoke check took, so that phibuild's own overhead can be told apart."""
    process = run([str(BIN / "python"), "-c", TIMED_DOIT, *doit(root, *args)[1:]], env=ENV)
    steps = STEP.findall(process.output)
    return TimedBuild(process, [float(s) for kind, s in steps if kind == "build"],
                      [float(s) for kind, s in steps if kind == "smoke"])


def installed_backends() -> list[str]:
    """The backends whose toolchain has a lock for this interpreter and platform (what a project's default
    ``backends`` builds)."""
    from phibuild import backends
    from phibuild.errors import ConfigError
    from phibuild.toolchains import declare

    found = []
    for name in BACKENDS:
        try:
            declare.locked(backends.get(name).toolchain)
        except ConfigError:
            continue
        found.append(name)
    return found


def selection(parser: argparse.ArgumentParser) -> None:
    """``--models`` and ``--backends`` options, for a quick run over part of the matrix."""
    parser.add_argument("--models", nargs="+", default=list(EMBEDDED_TEXT), choices=EMBEDDED_TEXT, metavar="MODEL",
                        help=f"embedded models (default: all of {', '.join(EMBEDDED_TEXT)})")
    parser.add_argument("--backends", nargs="+", default=None, choices=BACKENDS, metavar="BACKEND",
                        help="backends (default: every installed one)")


# -- the backends' own commands ----------------------------------------------------------------------------

GGUF = """import os, sys
from pathlib import Path
from phibuild.backends.gguf.convert import convert
from phibuild.backends.gguf import quantize
source, out, base, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
out.mkdir()
convert(source, out / f"model-{base}.gguf", base)
if kind.lower() != base:
    quantize(out / f"model-{base}.gguf", out / "model.gguf", kind, os.cpu_count() or 1)
"""


def raw_command(backend: str, model: Path, precision: str, out: Path) -> list[str]:
    """The backend's own command for one target, with the parameters phibuild uses by default: ONNX Runtime
    GenAI's builder CLI, optimum-cli, mlx_lm.convert, and for GGUF our converter and llama.cpp's quantizer."""
    from phibuild import backends

    params = backends.get(backend).params(precision, {})
    python = str(BIN / "python")
    if backend == "onnx":
        provider = params.pop("execution_provider")
        options = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(params.items())]
        return [python, "-m", "onnxruntime_genai.models.builder", "-m", str(model), "-i", str(model), "-o", str(out),
                "-p", precision, "-e", provider, "-c", f"{out}-cache",
                *(["--extra_options", *options] if options else [])]
    if backend == "openvino":
        command = [str(BIN / "optimum-cli"), "export", "openvino", "--model", str(model),
                   "--task", "text-generation-with-past", "--weight-format", precision]
        if precision == "int4":
            command += [*(["--sym"] if params["sym"] else []), "--group-size", str(params["group_size"]),
                        "--ratio", str(params["ratio"])]
        return [*command, str(out)]
    if backend == "mlx":
        command = [str(BIN / "mlx_lm.convert"), "--hf-path", str(model), "--mlx-path", str(out)]
        if "bits" in params:
            return [*command, "-q", "--q-bits", str(params["bits"]), "--q-group-size", str(params["group_size"])]
        return [*command, "--dtype", params["dtype"]]
    if backend == "gguf":
        return [python, "-c", GGUF, str(model), str(out), params["base"], params["type"]]
    raise ValueError(f"unknown backend {backend}")


def raw_build(backend: str, model: Path, precision: str, out: Path) -> Process:
    """Run the backend's own command into ``out``, then delete what it wrote."""
    try:
        return run(raw_command(backend, model, precision, out), env=ENV)
    finally:
        for path in (out, Path(f"{out}-cache")):
            shutil.rmtree(path, ignore_errors=True)


# -- reporting -------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, so that a script's output can be pasted into bench/README.md as it is."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def secs(value: float) -> str:
    if abs(value) < 0.1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.3f} s" if abs(value) < 10 else f"{value:.1f} s"


def size(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / MiB:.1f} MiB"


def filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (longest matching mount point in /proc/mounts)."""
    path = path.resolve()
    found, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if (path == Path(mount) or Path(mount) in path.parents) and len(mount) > len(found):
            found, kind = mount, fstype
    return kind


def machine(*paths: Path) -> str:
    """One paragraph on where the figures come from: CPU, cores, RAM, filesystems, Python, package versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    memory = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    versions = []
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{package} {metadata.version(package)}")
    places = ", ".join(f"{path} on {filesystem(path)}" for path in paths)
    return (f"{cpu}, {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {memory / GiB:.1f} GiB RAM, "
            f"Linux {platform.release()}; {places or 'filesystem: ' + filesystem(Path.cwd())}; "
            f"Python {platform.python_version()}; {', '.join(versions)}")
