# Shared by the run_* scripts: pick the launcher. NPROC defaults to the number of GPUs (8 on the
# speedrun node), or 1 on a machine without CUDA (NPROC=2 runs 2 gloo processes on CPU). NPROC>1
# launches torchrun on this node; for several nodes run the same script on every node with NNODES and
# RDZV_ENDPOINT (host:port on node 0, reachable from all nodes), optionally RDZV_ID (a job id the nodes
# share); the c10d rendezvous assigns the ranks (NODE_RANK, if set, is passed on but not needed).
# torchrun runs as `$PYTHON -m torch.distributed.run`, so it uses the same interpreter (and virtual
# environment) as the one-process path, activated or not.
# DIST_TIMEOUT_S (default 1800: outlasts a cold compile; --dist-timeout-s wins) bounds how long the ranks wait
# for a hung one (core/distributed.py).
PYTHON=${PYTHON:-python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$($PYTHON -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
fi
launch() {
  if [ "${NNODES:-1}" -gt 1 ]; then
    $PYTHON -m torch.distributed.run --nnodes="$NNODES" ${NODE_RANK:+--node_rank="$NODE_RANK"} \
      --nproc_per_node="$NPROC" --rdzv_backend=c10d --rdzv_id="${RDZV_ID:-speedrun-mup}" \
      --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}" train.py "$@"
  elif [ "$NPROC" -gt 1 ]; then
    $PYTHON -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py "$@"
  else
    $PYTHON train.py "$@"
  fi
}
