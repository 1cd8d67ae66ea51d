"""Process-group and device setup, in one place. Nothing here runs at import time.

`torchrun` sets RANK / LOCAL_RANK / WORLD_SIZE; without them training runs in one process with no
process group at all. NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group

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


def setup_distributed(device_flag: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Read torchrun's environment, pick the device, and start the process group when world size > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_flag, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistInfo(0, 0, 1, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return DistInfo(rank, local_rank, world_size, device, backend)


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a device tensor over ranks (in place); a no-op on one process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.AVG if info.backend == "nccl" else dist.ReduceOp.SUM)
        if info.backend != "nccl":  # gloo has no AVG
            t.div_(info.world_size)
    return t
