"""Training schedules of the record (modded-nanogpt 2025-07-12_BosAlign): LR, sliding window, Muon momentum."""
from __future__ import annotations

import math

from core.attention import BLOCK_SIZE


def lr_factor(step: int, total: int, cooldown_frac: float, final_frac: float = 0.05) -> float:
    """Constant LR, then a linear cool-down over the last `cooldown_frac` of training to `final_frac`."""
    x = min(max(step / total, 0.0), 1.0)
    if cooldown_frac <= 0.0:
        return 1.0
    w = min((1.0 - x) / cooldown_frac, 1.0)  # 1 -> 0 over the cool-down
    return w + (1.0 - w) * final_frac


def window_blocks(step: int, total: int, window_max: int) -> int:
    """Long sliding window, in 128-token blocks, growing linearly over training.

    The record takes the next multiple of 128 of 1728 * progress: 1 block at the start and 14 blocks
    (1792 tokens) at the end. With window_max W this is ceil((W - 64) * progress / 128), at least 1.
    The short window of half the layers is half of it (core/model.py).
    """
    x = min(max(step / total, 0.0), 1.0)
    return max(1, math.ceil((window_max - BLOCK_SIZE // 2) * x / BLOCK_SIZE))


def muon_momentum(step: int, warmup_steps: int, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum warm-up: `start` -> `end` linearly over `warmup_steps` (record: 0.85 -> 0.95 over 300)."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1.0 - frac) * start + frac * end
