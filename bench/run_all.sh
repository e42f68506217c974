#!/usr/bin/env bash
# Every benchmark, one after another, at the sizes bench/README.md reports. Takes about 25 minutes on 2 cores and
# needs about 10 GB free in BENCH_DIR. Run it with the Python of the environment phibuild and its backends are
# installed in:
#
#   PYTHON=.venv/bin/python DVC=dvc BENCH_DIR=/tmp bench/run_all.sh 2>&1 | tee bench.log
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
DVC=${DVC:-dvc}
BENCH_DIR=${BENCH_DIR:-${TMPDIR:-/tmp}}

run() {
    echo
    echo "## $*"
    "$PYTHON" "$@"
}

run hashing.py --dir "$BENCH_DIR" --size-gib 4 --repeat 5 --cold-repeat 3
run noop.py --dvc "$DVC" --repeat 5
run restore.py --dir "$BENCH_DIR" --sizes-mib 64 512 2048 --repeat 5
run backends.py --dir "$BENCH_DIR" --repeat 3
run scale.py --dir "$BENCH_DIR/phibuild-bench-scale" --layers 1 2 4
run fidelity.py --dir "$BENCH_DIR"
