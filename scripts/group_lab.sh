#!/usr/bin/env bash
# Which Adam group drifts under SP, and which one costs muP its loss at width 256 (issue 19, README
# "muP transfer"): the transfer lab's byte proxy, model and 150 steps, with ONE Adam group's LR swept at a
# time, the others at the record's: the embeddings and value embeddings (adam-embed, --embed-lr-mult), the
# readout (adam-head, --head-lr-mult), the scalars (adam-scalar, --scalar-lr-mult); widths 32 and 256, muP
# and SP, 5 points x2 apart around the record's LR (x0.25 .. x4), 3 seeds.
#   SWEEP_JOBS=2 bash scripts/group_lab.sh             # resumes from what docs/transfer_groups/runs/ holds
#   python -m core.sweep collect docs/transfer_groups  # verdict per group (drift over widths 32 -> 256)
# Predicted before the runs. Under SP the readout z = x W^T / (7.5 sqrt(d)) moves by ~lr d / sqrt(d) per Adam
# step (d correlated O(lr) coordinates), so its optimal LR falls like 1/sqrt(d): adam-head drift -0.5 under SP,
# 0 under muP (the 1/m multiplier makes it lr d0 / sqrt(d0)). The embeddings are RMS-normed input weights and
# the scalars have no width dimension: drift 0 under both. SP's joint Adam-LR drift (-0.26 .. -0.30, README)
# is then the compromise between a head that wants -0.5 and groups that want 0. The 0.7% that muP loses to SP
# tuned per width at width 256: a hypothesis, the readout. At width 256 muP's readout divisor is
# 7.5 sqrt(32) x 8 = 339 against SP's 7.5 sqrt(256) = 120, and SP tuned runs 1.8x below muP's LR (0.0040 vs
# 0.0071), so SP's readout moves ~1.6x more per step. If that is the cost, muP's adam-head curve at width 256
# is lower at x2-x4 than at x1, and the embed and scalar curves are not.
# Env: SWEEP_JOBS, SWEEP_DIR (docs/transfer_groups/runs), SEEDS ("1 2 3"), WIDTHS ("32 256"), PARAMS
#   ("mup sp"), SWEPT ("adam-embed adam-head adam-scalar"), STEPS (150), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SWEEP_DIR=${SWEEP_DIR:-docs/transfer_groups/runs}
mkdir -p "$SWEEP_DIR"
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo unknown) ${SEEDS:-1 2 3}" >> "$SWEEP_DIR/COMMITS"
TRAIN=(--data embedded-bytes --depth 4 --head-dim 32 --seq-len 512 --batch-tokens 1024 --iterations "${STEPS:-150}"
  --val-every 0 --val-seq-len 512 --val-tokens 32768 --window-max 512 --muon-momentum-warmup 50
  --log-every 50 --use-wandb false)
$PYTHON -m core.sweep run "$SWEEP_DIR" --base-width 32 --widths ${WIDTHS:-32 256} --seeds ${SEEDS:-1 2 3} \
  --params ${PARAMS:-mup sp} --swept ${SWEPT:-adam-embed adam-head adam-scalar} --lr-mults 0.25 0.5 1 2 4 \
  --jobs "${SWEEP_JOBS:-1}" --no-collect -- "${TRAIN[@]}"
