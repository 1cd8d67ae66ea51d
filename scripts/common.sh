# Shared by the run_* scripts: pick the launcher. NPROC defaults to the number of GPUs (8 on the
# speedrun node), or 1 on a machine without CUDA. NPROC>1 launches torchrun on this node; for several
# nodes set NNODES, NODE_RANK and RDZV_ENDPOINT (host:port of node 0).
PYTHON=${PYTHON:-python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$($PYTHON -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
fi
launch() {
  if [ "${NNODES:-1}" -gt 1 ]; then
    torchrun --nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --nproc_per_node="$NPROC" \
      --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" train.py "$@"
  elif [ "$NPROC" -gt 1 ]; then
    torchrun --standalone --nproc_per_node="$NPROC" train.py "$@"
  else
    $PYTHON train.py "$@"
  fi
}
