#!/usr/bin/env bash
# Standard-parametrisation speedrun (no muP).
#   bash scripts/run_basic_speedrun.sh [WIDTH] [STEPS] [SEED]      e.g. 768 1750 1337
# Omitted arguments take train.py's hardware defaults (the record on CUDA, a small model on CPU).
# Env: NPROC (GPUs/processes), EXTRA_ARGS (more train.py flags), MONITOR_SPECTRAL_EVERY, MONITOR_ACTIVATIONS.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
args=()
[ -n "${1:-}" ] && args+=(--width "$1")
[ -n "${2:-}" ] && args+=(--iterations "$2")
[ -n "${3:-}" ] && args+=(--seed "$3")
launch "${args[@]}" --wandb-project "${WANDB_PROJECT:-speedrun-basic}" ${EXTRA_ARGS:-}
