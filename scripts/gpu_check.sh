#!/usr/bin/env bash
# Prepared GPU check (issue 13): the CUDA paths measured in one short run on one H100/H200.
#   bash scripts/gpu_check.sh            # at most ~8 minutes: one table, bench/results/gpu_check.json
#   bash scripts/gpu_check.sh --dry-run  # the same plumbing on CPU at toy size (a test)
# Flags: --steps N (training steps per run, default 30), --budget-s S (default 480), --out PATH.
# What each section measures and where the record's numbers come from: bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
exec "$PYTHON" bench/gpu_check.py "$@"
