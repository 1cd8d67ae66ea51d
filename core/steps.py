"""The building blocks of a training step: the model, its optimizers, their schedules, one step's
forward/backward and the validation loss.

The trainer (core/trainer.py), the coordinate check (core/coord_check.py), the benchmarks (bench/) and
the tests build the same model and take the same steps with these; nothing here knows about logging,
checkpoints or the command line, so every one of them can import this module without a circle.
"""
from __future__ import annotations

import resource

import torch
import torch.nn as nn

from core import depth_mup, mup
from core.config import TrainConfig
from core.data import GPT2_VOCAB
from core.distributed import DistInfo, all_reduce_mean
from core.model import GPT, GPTConfig
from core.optimizers import DEFAULT_LR_MULS, build_optimizers, set_muon_momentum
from core.schedule import lr_factor


# ---------------------------------------------------------------------------------------------
# Model and optimizers


def model_config(cfg: TrainConfig, fp8_mode: str = "off", max_seq_len: int | None = None) -> GPTConfig:
    # vocab_size / bos_id None: no data source was consulted (a test or a benchmark): GPT-2, the default data's
    return GPTConfig(vocab_size=cfg.vocab_size or GPT2_VOCAB.size,
                     bos_id=GPT2_VOCAB.bos_id if cfg.bos_id is None else cfg.bos_id,
                     depth=cfg.depth, width=cfg.width, head_dim=cfg.head_dim,
                     max_seq_len=max_seq_len or max(cfg.seq_len, cfg.val_seq_len), fp8=fp8_mode,
                     mup=cfg.mup, base_width=cfg.base_width if cfg.mup else None, mup_mistake=cfg.mup_mistake,
                     depth_mup=cfg.depth_mup, base_depth=cfg.base_depth if cfg.depth_mup != "off" else None,
                     depth_mistake=cfg.depth_mistake)


def build_model(cfg: TrainConfig, device: torch.device, fp8_mode: str = "off") -> GPT:
    """The model on `device`, seeded; embeddings in bf16 on CUDA as in the record."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, fp8_mode)).to(device)
    if device.type == "cuda":
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.bfloat16()
    return model


def build_optimizer_pair(model: GPT, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
    """muP LR multipliers (if --mup), depth-muP LR and eps factors (if --depth-mup), then the record's DistAdam +
    Muon; returns (adam, muon, mup_table)."""
    table = mup.apply_mup(model, cfg.base_width) if cfg.mup else None
    if cfg.depth_mup != "off":
        depth_mup.apply_depth_mup(model)  # its factors are printed from the config (depth_mup.describe)
    # --lr-mult scales every LR of both optimizers together (the swept quantity of a global-LR sweep)
    adam, muon = build_optimizers(model, model.param_kinds(), adam_lr=cfg.adam_lr * cfg.lr_mult,
                                  muon_lr=cfg.muon_lr * cfg.lr_mult, lr_muls=group_lr_muls(cfg), rank=rank,
                                  world_size=world_size)
    return adam, muon, table


def group_lr_muls(cfg: TrainConfig) -> dict[str, float] | None:
    """The record's per-kind Adam LR multipliers times --embed/--head/--scalar-lr-mult (one group's LR alone, for
    the per-group sweeps of the transfer lab); None when all three are 1 (the record's, bitwise)."""
    mults = {"embed": cfg.embed_lr_mult, "value_embed": cfg.embed_lr_mult, "lm_head": cfg.head_lr_mult,
             "scalar": cfg.scalar_lr_mult}
    if all(m == 1.0 for m in mults.values()):
        return None
    return {kind: DEFAULT_LR_MULS[kind] * m for kind, m in mults.items()}


def set_schedules(cfg: TrainConfig, optimizers, muon, step: int) -> float:
    """LR factor for every group and the Muon momentum warm-up at `step`; returns the LR factor."""
    factor = lr_factor(step, cfg.iterations, cfg.cooldown_frac, cfg.final_lr_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
    set_muon_momentum(muon, step, cfg.muon_momentum_warmup)
    return factor


def activation_modules(model: GPT) -> dict[str, nn.Module]:
    """The modules whose outputs the monitor's activation statistics measure, by metric name."""
    mods = {"embed": model.embed, "lm_head": model.lm_head}
    for i, block in enumerate(model.blocks):
        if block.attn is not None:
            mods[f"block{i}_attn"] = block.attn
        mods[f"block{i}_mlp"] = block.mlp
        mods[f"block{i}"] = block
    return mods


# ---------------------------------------------------------------------------------------------
# One step's forward/backward, and the validation loss


_window_tensors: dict[tuple, torch.Tensor] = {}


def window_tensor(blocks: int, device: torch.device) -> torch.Tensor:
    """The window as a cached 0-dim tensor: a compiled model sees a tensor, not a new int, so no recompile."""
    key = (blocks, str(device))
    if key not in _window_tensors:
        # pinned + non_blocking, as the record's get_window_size_blocks_helper: no host sync when the window grows
        host = torch.tensor(blocks, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        _window_tensors[key] = host.to(device, non_blocking=True)
    return _window_tensors[key]


def forward_backward(model, batches, window: int, grad_accum: int, chunked: bool = False) -> torch.Tensor:
    """Sum-reduced loss per micro-batch (as the record: keeps FP8 e5m2 gradients in range), divided by
    grad_accum so that 1 process x A micro-batches == A ranks x 1. Returns the summed loss (device).
    `chunked`: the readout and loss in row chunks (core/chunked_loss.py), else the record's."""
    device = batches[0][0].device
    total = None  # in the loss's dtype (float64 in the golden test)
    for inputs, targets in batches:
        loss = model(inputs, targets, window_tensor(window, device), chunked=chunked)
        (loss / grad_accum).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


@torch.no_grad()
def evaluate(model, val_set, window: int, info: DistInfo, chunked: bool = False) -> torch.Tensor:
    """Mean validation loss per token over this rank's share, averaged over ranks (device tensor).
    `chunked`: the readout and loss in row chunks (core/chunked_loss.py), else the record's."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=info.device)
    for inputs, targets in val_set:
        total += model(inputs, targets, window_tensor(window, info.device), reduction="mean", chunked=chunked)
    total /= max(len(val_set), 1)
    model.train(was_training)
    return all_reduce_mean(total, info)


# ---------------------------------------------------------------------------------------------
# Device timing and memory


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_metrics(device: torch.device, peaks=None) -> dict[str, float]:
    if device.type == "cuda" and peaks is not None:  # PhasePeaks resets the allocator's peak at phase changes
        return {"Hardware/peak_memory_mb": peaks.peak_so_far_mib(),
                "Hardware/reserved_memory_mb": peaks.reserved_so_far_mib()}
    if device.type == "cuda":
        return {"Hardware/peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "Hardware/reserved_memory_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    # ru_maxrss is in KiB on Linux: the process's peak resident memory
    return {"Hardware/peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
