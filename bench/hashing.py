"""Benchmark 1: the first hash of a large weights file, against reading it (cat) and against MD5.

phibuild hashes every weights file once (xxh3-128 in reads of hashing.CHUNK, 1 MiB); doit's default checker and
DVC hash with MD5. xxh3-128 with 16 MB reads is timed too: the same hash with a buffer larger than the CPU's L2
cache, which phibuild used before this benchmark showed it slower. The file is random bytes, written here and
deleted afterwards. Each contender is timed with the file in the page cache (best of --repeat), then, when this
process may drop the page cache (root), from the disk.

    python bench/hashing.py [--dir DIR] [--size-gib 4] [--repeat 3] [--no-cold]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash
from benchlib import GiB, MiB, best, drop_caches, machine, quiet, rounds, secs, size, table, verdict
from doit.dependency import get_file_md5

from phibuild.hashing import CHUNK, StatCache

TARGET_OVER_CAT = 1.6
TARGET_UNDER_MD5 = 8.0


def write_random(path: Path, total: int) -> None:
    """``total`` random bytes, generated a chunk at a time (numpy's generator is faster than os.urandom)."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as handle:
        for done in range(0, total, CHUNK):
            handle.write(rng.bytes(min(CHUNK, total - done)))


def read_hash(path: Path, hasher, chunk: int) -> str:
    """``path`` hashed by ``hasher`` as phibuild reads: ``chunk`` bytes at a time into one reused buffer."""
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            hasher.update(view[:n])
    return hasher.hexdigest()


def cached_share(path: Path) -> str:
    """How much of ``path`` is in the page cache, by util-linux's fincore (mincore(2)), if installed."""
    if not shutil.which("fincore"):
        return "unknown (no fincore)"
    resident = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                              capture_output=True, text=True, check=True).stdout.strip()
    return f"{int(resident) / path.stat().st_size:.0%} in the page cache"


CAT = "cat file > /dev/null"
OURS = f"phibuild: StatCache.digest (xxh3-128, {CHUNK // MiB} MiB reads)"
DOIT_MD5 = "doit: get_file_md5 (MD5, 8 KB reads)"
MD5 = "hashlib.md5, 16 MiB reads (MD5 at its best)"
XXH3_16M = "xxh3-128, 16 MiB reads (a buffer larger than L2)"


def contenders(path: Path, scratch: Path) -> dict[str, Callable[[], object]]:
    def phibuild() -> None:  # a new, empty stat cache each time: the first hash, never a cached digest
        with tempfile.TemporaryDirectory(dir=scratch) as directory:
            cache = StatCache(Path(directory) / "statcache.sqlite")
            cache.digest(path)
            cache.close()

    return {
        CAT: lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True),
        OURS: quiet(phibuild),  # quiet: its progress bar
        DOIT_MD5: lambda: get_file_md5(str(path)),
        MD5: lambda: read_hash(path, hashlib.md5(), 16 * MiB),
        XXH3_16M: lambda: read_hash(path, xxhash.xxh3_128(), 16 * MiB),
    }


def report(title: str, times: dict[str, list[float]], total: int) -> list[str]:
    """The table for one cache state, and the verdict lines for the two targets."""
    fastest = {name: best(samples) for name, samples in times.items()}
    ours = fastest[OURS]
    rows = [(name, secs(seconds), f"{total / seconds / GiB:.2f} GiB/s", f"{seconds / ours:.2f}x")
            for name, seconds in fastest.items()]
    print(f"\n### {title}\n")
    print(table(["contender", f"best of {len(times[OURS])}", "throughput", "time / phibuild's"], rows))
    over_cat, doit_md5, md5 = ours / fastest[CAT], fastest[DOIT_MD5] / ours, fastest[MD5] / ours
    near = over_cat <= TARGET_OVER_CAT
    return [
        f"{title}: phibuild / cat = {over_cat:.2f} (target <= {TARGET_OVER_CAT}: {verdict(near)})",
        f"{title}: doit's MD5 / phibuild = {doit_md5:.1f}x, MD5 at its best / phibuild = {md5:.1f}x (target >= "
        f"{TARGET_UNDER_MD5:g}x: {verdict(doit_md5 >= TARGET_UNDER_MD5)} against doit's MD5, "
        f"{verdict(md5 >= TARGET_UNDER_MD5)} against MD5 at its best)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where to write the file (default: the temp dir)")
    parser.add_argument("--size-gib", type=float, default=4.0, help="file size in GiB (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender with a warm cache (default 3)")
    parser.add_argument("--cold-repeat", type=int, default=1, help="runs per contender from the disk (default 1)")
    parser.add_argument("--no-cold", action="store_true", help="skip the runs from the disk (drop_caches)")
    args = parser.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="phibuild-bench-hash-", dir=args.dir))
    path, total = scratch / "weights.bin", int(args.size_gib * GiB) // MiB * MiB
    try:
        print(f"Machine: {machine(scratch)}")
        print(f"\nwriting {size(total)} of random bytes to {path} ...", flush=True)
        write_random(path, total)
        print(f"file: {size(total)}, {cached_share(path)} after writing")
        verdicts = report("page cache warm", rounds(contenders(path, scratch), args.repeat), total)
        if not args.no_cold:
            if drop_caches():
                print(f"\ndropping the page cache before each run; now {cached_share(path)}")
                times = rounds(contenders(path, scratch), args.cold_repeat, before=drop_caches)
                verdicts += report("from the disk (page cache dropped before each run)", times, total)
            else:
                print("\ncannot drop the page cache (needs root): no run from the disk")
        print("\n" + "\n".join(verdicts))
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
