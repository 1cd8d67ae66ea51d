#!/usr/bin/env bash
# Width x learning-rate sweep: does the optimal LR found at BASE_WIDTH stay optimal at every width?
#   bash scripts/run_mup_width_group_scaling.sh BASE_WIDTH "TARGET_WIDTHS" [STEPS] [SEED]
#   e.g. bash scripts/run_mup_width_group_scaling.sh 256 "512 768 1024 1536" 1000 1337
# For every parametrisation in PARAMS, swept LR in SWEEP_LR, multiplier in LR_MULTS, width in BASE + TARGETS
# and seed in SEEDS, one run of train.py (core/sweep.py runs them, SWEEP_JOBS at a time, and resumes a killed
# sweep where it was); then the transfer verdict (core/transfer.py): eta* per width with intervals, the drift
# of the optimum with width, the regret of the base width's eta*, PASS/FAIL per parametrisation, the figures.
# Env (defaults): NPROC (GPUs per run, or 1), SWEEP_JOBS (1: runs at once; one thread each on CPU, NPROC GPUs
#   each on CUDA), LR_MULTS ("0.25 0.5 1 2 4", x the record's LR), SWEEP_LR ("adam muon"; "lr" sweeps
#   --lr-mult), PARAMS ("mup sp"; also mistake:<name>:<swept>, core/mup.py MUP_MISTAKES), SEEDS (SEED),
#   MISTAKE_SEEDS (SEEDS: the seeds of the mistake:* runs),
#   SWEEP_DIR (logs/sweep_<timestamp>), EXTRA_ARGS (more train.py flags), WANDB_PROJECT (speedrun-mup-group;
#   every run of the sweep joins the W&B group named after SWEEP_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/run_mup_width_group_scaling.sh BASE_WIDTH \"TARGET_WIDTHS\" [STEPS] [SEED]" >&2
  exit 2
fi
BASE=$1; TARGETS=$2; STEPS=${3:-}; SEED=${4:-1337}
if [ -z "${TARGETS// /}" ]; then
  echo "error: the list of target widths is empty: give at least one, e.g. \"512 768\"" >&2
  exit 2
fi
SWEEP_DIR=${SWEEP_DIR:-logs/sweep_$(date +%Y%m%d_%H%M%S)}
train_args=(${EXTRA_ARGS:-})
[ -n "$STEPS" ] && train_args+=(--iterations "$STEPS")
# core.sweep validates every width before the first (expensive) run, then runs and collects.
exec $PYTHON -m core.sweep run "$SWEEP_DIR" --base-width "$BASE" --widths $BASE $TARGETS --seeds ${SEEDS:-$SEED} \
  ${MISTAKE_SEEDS:+--mistake-seeds $MISTAKE_SEEDS} \
  --params ${PARAMS:-mup sp} --swept ${SWEEP_LR:-adam muon} --lr-mults ${LR_MULTS:-0.25 0.5 1 2 4} \
  --jobs "${SWEEP_JOBS:-1}" --nproc "$NPROC" --wandb-project "${WANDB_PROJECT:-speedrun-mup-group}" -- "${train_args[@]}"
