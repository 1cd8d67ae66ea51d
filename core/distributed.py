"""Process-group and device setup, and the few cross-rank reductions the trainer needs. Nothing here
runs at import time.

`torchrun` sets RANK / LOCAL_RANK / WORLD_SIZE; without them training runs in one process with no
process group at all (and none of the functions below makes a `torch.distributed` call). NCCL on
CUDA, gloo on CPU; one node or many, as torchrun launches them:

    torchrun --standalone --nproc_per_node=8 train.py ...                      # one node
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 \\
             --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 train.py ...      # each of 2 nodes

Failure handling: a rank that raises or dies makes torchrun stop the others at once. A rank that
hangs is caught by the process-group timeout (`--dist-timeout-s`, else `DIST_TIMEOUT_S`, else 1800 s):
the waiting ranks' collectives fail after it (gloo raises; NCCL's watchdog tears the process down, the
default TORCH_NCCL_ASYNC_ERROR_HANDLING=3), and torchrun then stops the whole job. The default is 30
minutes because the ranks meet at their first collective only after each compiled the model: a cold
compile of the record takes minutes and differs between ranks (issue 21: the old 300 s could kill a job
whose ranks finished compiling minutes apart). The run log and config.json carry the value in use.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from core.config import ConfigError, check_dist_timeout

# Long enough for the slowest rank's cold torch.compile (minutes for the record, more on a cold inductor
# cache or a loaded host) and for rank 0 to build the data cache while the others wait at a barrier; a
# hung rank still ends the job within the half hour.
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    timeout_s: float | None = None  # the process group's timeout (None: not resolved, e.g. a test's DistInfo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def pick_device(device_flag: str, local_rank: int = 0) -> torch.device:
    if device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available: use --device cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def process_group_timeout(env: dict | None = None, flag: float | None = None) -> float:
    """Seconds a collective may wait for the other ranks: `flag` (--dist-timeout-s), else `DIST_TIMEOUT_S`,
    else DEFAULT_TIMEOUT_S (30 min). A value <= 0 or not a number raises ConfigError (exit 2) saying so."""
    check_dist_timeout(flag)
    if flag is not None:
        return float(flag)
    env = os.environ if env is None else env
    raw = env.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds, e.g. 1800") from None
    check_dist_timeout(value, given_as=f"{TIMEOUT_ENV}={raw!r}")
    return value


def timeout_note(seconds: float, info: DistInfo) -> str:
    """The process-group timeout as a sentence for the run log."""
    where = (f"{info.backend} process group of {info.world_size} ranks" if info.distributed
             else "no process group (single process); a multi-rank run would use it")
    return f"process-group timeout: {seconds:g} s ({seconds / 60:g} min) | {where}"


def setup_distributed(device_flag: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Read torchrun's environment, pick the device, and start the process group when world size > 1.

    timeout_s: how long a collective waits for a missing rank before failing (None: `process_group_timeout()`:
    DIST_TIMEOUT_S or 30 min). DistInfo.timeout_s carries it, also on one process (for the log and config.json).
    """
    timeout_s = process_group_timeout(flag=timeout_s)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_flag, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistInfo(0, 0, 1, device, None, timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == "cuda":
        kwargs["device_id"] = device  # binds the communicator to this GPU (eager NCCL init)
    dist.init_process_group(**kwargs)
    return DistInfo(rank, local_rank, world_size, device, backend, timeout_s)


def teardown(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group. After a finished run, wait for every rank first: a gloo group destroyed while
    a peer is still writing its last checkpoint and logs can abort the process at exit ("terminate called
    without an active exception", seen once in a 2-rank CPU test). On an error path no rank waits."""
    if info.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Reductions (each a no-op on one process)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a device tensor over ranks (in place) and return it."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.AVG)  # NCCL and (torch >= 2.13) gloo both implement AVG
    return t


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s value of a small picklable object (e.g. the run name), on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    # NCCL moves the pickled bytes through the current CUDA device, which setup_distributed has set.
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def sharded_grad_sq(optimizers, device: torch.device) -> torch.Tensor:
    """Sum of squares (fp32, 0-dim) of the averaged-gradient shards this rank's optimizers kept in their last
    distributed `step()` (`averaged_grad_shards`), which it then empties.

    The optimizers reduce-scatter the gradients anyway (DistAdam by rows, Muon by matrix), so over the
    ranks the shards cover the averaged gradient exactly once: the SUM of this value over ranks is the
    squared norm one process would see on the same global batch. One scalar, instead of all-reducing a
    copy of every gradient (1.1 GB in fp32 for the record's model; issue 13 item 4). Pad rows and the
    empty slots of a short Muon chunk are zeros or absent, so they add nothing.
    """
    shards = [g for opt in optimizers for g in getattr(opt, "averaged_grad_shards", ())]
    drop_grad_shards(optimizers)
    if not shards:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(shards, 2, dtype=torch.float32)).square().sum()


def drop_grad_shards(optimizers) -> None:
    """Forget the optimizers' averaged-gradient shards (so their memory is free before the next backward)."""
    for opt in optimizers:
        if getattr(opt, "averaged_grad_shards", None):
            opt.averaged_grad_shards = []


@torch.no_grad()
def global_grad_norm_from_shards(optimizers, info: DistInfo) -> torch.Tensor:
    """L2 norm of the rank-averaged gradient from the optimizers' shards (call after their `step()`): one
    scalar all-reduce. The trainer folds the same sum into the guard's per-step all-reduce instead
    (`NonFiniteGuard.agree`); this stand-alone form is for tools and tests."""
    sq = sharded_grad_sq(optimizers, info.device)
    if info.distributed:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    return sq.sqrt()


@torch.no_grad()
def global_grad_norm(params, info: DistInfo) -> torch.Tensor:
    """L2 norm (fp32, 0-dim device tensor) of the gradient averaged over ranks: the gradient the optimizers
    apply, and the norm one process would see on the same global batch.

    The optimizers average gradients inside `step()` and leave each rank's `.grad` local, so the local
    norm differs per rank (and overstates the global one by the batch noise). With several ranks this
    all-reduces an fp32 copy of the gradients (the parameters' size, once per call): a reference for the
    tests. The trainer gets the same value from the optimizers' shards (`sharded_grad_sq`) instead.
    Parameters without a gradient count as zero.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not info.distributed:
        if not grads:
            return torch.zeros((), device=info.device)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
    # every rank sends one value per parameter element, gradient or not, so the sizes always match
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                      for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG)
    return torch.linalg.vector_norm(flat)
