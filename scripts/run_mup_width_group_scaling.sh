#!/usr/bin/env bash
# Width x learning-rate sweep: does the optimal LR found at BASE_WIDTH stay optimal at every width?
#   bash scripts/run_mup_width_group_scaling.sh BASE_WIDTH "TARGET_WIDTHS" [STEPS] [SEED]
#   e.g. bash scripts/run_mup_width_group_scaling.sh 256 "512 768 1024 1536" 1000 1337
# For every parametrisation in PARAMS, width in BASE + TARGETS, swept LR in SWEEP_LR and multiplier in
# LR_MULTS, one run of train.py; then the runs are collected into sweep.csv and the transfer figure
# (val loss vs LR, one curve per width, muP beside SP) and each width's optimal LR is printed.
# Env (defaults): NPROC (GPUs or 1), LR_MULTS ("0.25 0.5 1 2 4", times the record's LR),
#   SWEEP_LR ("adam muon": which LR to sweep, the other stays at its default), PARAMS ("mup sp"),
#   SWEEP_DIR (logs/sweep_<timestamp>), EXTRA_ARGS (more train.py flags), WANDB_PROJECT (speedrun-mup-group).
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
LR_MULTS=${LR_MULTS:-"0.25 0.5 1 2 4"}
SWEEP_LR=${SWEEP_LR:-"adam muon"}
PARAMS=${PARAMS:-"mup sp"}
SWEEP_DIR=${SWEEP_DIR:-logs/sweep_$(date +%Y%m%d_%H%M%S)}
WIDTHS="$BASE $TARGETS"
# Validate every width before the first (expensive) run.
$PYTHON -m core.sweep check-widths $WIDTHS ${EXTRA_ARGS:-}
mkdir -p "$SWEEP_DIR"
echo "sweep folder: $SWEEP_DIR"
for param in $PARAMS; do
  for which in $SWEEP_LR; do
    for width in $WIDTHS; do
      for mult in $LR_MULTS; do
        lr=$($PYTHON -m core.sweep lr "$which" "$mult")
        name="${param}_${which}_w${width}_lrx${mult}_s${SEED}"
        if [ -f "$SWEEP_DIR/$name/summary.json" ]; then echo "skip $name (done)"; continue; fi
        args=(--width "$width" --seed "$SEED" --"$which"-lr "$lr" --log-dir "$SWEEP_DIR" --run-name "$name"
              --wandb-project "${WANDB_PROJECT:-speedrun-mup-group}")
        [ "$param" = mup ] && args+=(--mup --base-width "$BASE")
        [ -n "$STEPS" ] && args+=(--iterations "$STEPS")
        echo "== $name"
        launch "${args[@]}" ${EXTRA_ARGS:-} > "$SWEEP_DIR/$name.out" 2>&1 || echo "run $name failed: see $SWEEP_DIR/$name.out"
        tail -n 2 "$SWEEP_DIR/$name.out"
      done
    done
  done
done
$PYTHON -m core.sweep collect "$SWEEP_DIR" --base-width "$BASE"
