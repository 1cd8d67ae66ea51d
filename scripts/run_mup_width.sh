#!/usr/bin/env bash
# One muP run: hyperparameters tuned at BASE_WIDTH, used unchanged at TARGET_WIDTH.
#   bash scripts/run_mup_width.sh TARGET_WIDTH BASE_WIDTH [STEPS] [SEED]     e.g. 1024 768 1000 1337
# Env: NPROC, EXTRA_ARGS (e.g. "--coord-check"), WANDB_PROJECT (default speedrun-mup).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/run_mup_width.sh TARGET_WIDTH BASE_WIDTH [STEPS] [SEED]" >&2
  exit 2
fi
args=(--mup --width "$1" --base-width "$2")
[ -n "${3:-}" ] && args+=(--iterations "$3")
[ -n "${4:-}" ] && args+=(--seed "$4")
launch "${args[@]}" --wandb-project "${WANDB_PROJECT:-speedrun-mup}" ${EXTRA_ARGS:-}
