#!/usr/bin/env bash
# The transfer lab at 4x the horizon (README "muP transfer", "Horizon"): the same byte proxy, model and
# batch as scripts/transfer_lab.sh, 600 steps instead of 150 (4x the tokens at the same batch: the question
# is the horizon, not the batch size), widths 32 and 128, muP and SP, the Adam-LR and the Muon-LR sweep.
#   SWEEP_JOBS=2 bash scripts/horizon_lab.sh             # resumes from what docs/transfer_horizon/runs/ holds
# Each width gets 5 LR points x2 apart centred on that width's best 150-step grid point (seed mean, read
# from docs/transfer/sweep.csv), so the 4x optimum is bracketed whichever way it moves.
# Prediction (Bjorck et al. 2024, arXiv 2409.19913: eta*(D) ~ D^-0.32): every width's optimum falls by
# 4^-0.32 = 0.64x; under muP by the same factor at every width, under SP not necessarily.
# Env: SWEEP_JOBS, SWEEP_DIR (docs/transfer_horizon/runs), SEEDS ("1 2 3 4 5"), WIDTHS ("32 128"),
#   PARAMS ("mup sp"), SWEPT ("adam muon"), STEPS (600), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SWEEP_DIR=${SWEEP_DIR:-docs/transfer_horizon/runs}
SHORT_CSV=${SHORT_CSV:-docs/transfer/sweep.csv}
mkdir -p "$SWEEP_DIR"
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo unknown) ${SEEDS:-1 2 3 4 5}" >> "$SWEEP_DIR/COMMITS"
TRAIN=(--data embedded-bytes --depth 4 --head-dim 32 --seq-len 512 --batch-tokens 1024 --iterations "${STEPS:-600}"
  --val-every 0 --val-seq-len 512 --val-tokens 32768 --window-max 512 --muon-momentum-warmup 50
  --log-every 100 --use-wandb false)
for width in ${WIDTHS:-32 128}; do
  for param in ${PARAMS:-mup sp}; do
    for swept in ${SWEPT:-adam muon}; do
      mults=$($PYTHON -m core.horizon centre "$SHORT_CSV" --param "$param" --swept "$swept" --width "$width")
      echo "horizon lab: $param/$swept width $width: lr mults $mults"
      $PYTHON -m core.sweep run "$SWEEP_DIR" --base-width 32 --widths "$width" --seeds ${SEEDS:-1 2 3 4 5} \
        --params "$param" --swept "$swept" --lr-mults $mults --jobs "${SWEEP_JOBS:-1}" --no-collect -- "${TRAIN[@]}"
    done
  done
done
