#!/usr/bin/env bash
# The committed muP transfer experiment (README "muP transfer"): the byte-level proxy on CPU.
#   SWEEP_JOBS=2 bash scripts/transfer_lab.sh            # resumes from what docs/transfer/runs/ holds
# Depth 4, head_dim 32, widths 32-256 (8x), base width 32; 150 steps of 2 x 512 bytes; an Adam-LR sweep and
# a Muon-LR sweep of 7 points (x2 apart around the record's LRs), muP and SP; the negative
# controls no-readout-mult, readout-mult-squared and embed-lr-over-m (Adam sweep) and muon-lr-over-m (Muon
# sweep, one more point at x16), 3 seeds; muP and SP 5 seeds.
# Env: SWEEP_JOBS (runs at once; 1 thread each on CPU), SWEEP_DIR (docs/transfer/runs), SEEDS, MISTAKE_SEEDS,
#   WIDTHS, STEPS, PARAMS and SWEPT (a subset first, e.g. PARAMS="mup sp" SWEPT=adam SEEDS=1; the same folder
#   and settings, so a later full run skips what is done). On 8 GPUs with FineWeb see README "muP transfer" for the same command at widths 256-2048.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
SWEEP_DIR=${SWEEP_DIR:-docs/transfer/runs}
mkdir -p "$SWEEP_DIR"
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo unknown) ${SEEDS:-1 2 3 4 5}" >> "$SWEEP_DIR/COMMITS"
TRAIN=(--data embedded-bytes --depth 4 --head-dim 32 --seq-len 512 --batch-tokens 1024 --iterations "${STEPS:-150}"
  --val-every 0 --val-seq-len 512 --val-tokens 32768 --window-max 512 --muon-momentum-warmup 50
  --log-every 50 --use-wandb false)
$PYTHON -m core.sweep run "$SWEEP_DIR" --base-width 32 --widths ${WIDTHS:-32 64 128 256} \
  --seeds ${SEEDS:-1 2 3 4 5} --mistake-seeds ${MISTAKE_SEEDS:-1 2 3} \
  --params ${PARAMS:-mup sp mistake:no-readout-mult:adam mistake:muon-lr-over-m:muon \
  mistake:readout-mult-squared:adam mistake:embed-lr-over-m:adam} --swept ${SWEPT:-adam muon} \
  --lr-mults 0.125 0.25 0.5 1 2 4 8 --jobs "${SWEEP_JOBS:-1}" --no-collect -- "${TRAIN[@]}"
# muon-lr-over-m's optimum should grow like the width (x8 at width 256, the grid's edge): one more point, x16,
# brackets it. The same folder: plan.json is the union, and the verdict fits that key on 8 points.
if [ -z "${PARAMS:-}" ] || [[ "$PARAMS" == *muon-lr-over-m* ]]; then
  $PYTHON -m core.sweep run "$SWEEP_DIR" --base-width 32 --widths ${WIDTHS:-32 64 128 256} \
    --seeds ${MISTAKE_SEEDS:-1 2 3} --mistake-seeds ${MISTAKE_SEEDS:-1 2 3} --params mistake:muon-lr-over-m:muon \
    --swept muon --lr-mults 16 --jobs "${SWEEP_JOBS:-1}" --no-collect -- "${TRAIN[@]}"
fi
