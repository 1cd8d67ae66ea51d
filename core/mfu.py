"""Model FLOPs utilisation: analytic FLOPs per token of the speedrun GPT, hardware peaks, MFU.

Owns `flops_per_token` (forward + backward FLOPs from the model's shape, attention counted over the
windows actually used), `PEAK_BF16_TFLOPS` / `detect_peak_flops` (dense bf16 peak by device name,
never a guess) and `mfu`. Computed once from the config; nothing here profiles or syncs.

Convention (as in PaLM, appendix B, and nanoGPT's `estimate_mfu`): only matmuls count, 2 FLOPs per
multiply-accumulate, backward = 2x forward (gradients w.r.t. inputs and weights), so training is
3x the forward count. Elementwise work (norms, rotary, ReLU^2, soft-cap, softmax, cross-entropy,
value-embedding mixing, U-net/lambda scalars) is left out; it is a few percent at most and runs on
vector units, not the tensor cores the peak refers to.
"""
from __future__ import annotations

import math

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (the
# "with sparsity" figures halved). Matched by substring of `torch.cuda.get_device_name`, first
# match wins, so specific names come before generic ones.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # H100 SXM5 (device name "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("B200", 2250.0),
]


def detect_peak_flops(device: torch.device | str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """Peak dense bf16 FLOP/s of one `device` and the reason, or (None, why not).

    `override_tflops` (the `--peak-tflops` flag) wins. CPUs, MIG slices and GPUs missing from
    `PEAK_BF16_TFLOPS` give None: MFU is then reported as unavailable, not estimated.
    """
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"--peak-tflops must be positive, got {override_tflops}")
        return override_tflops * 1e12, f"peak {override_tflops:g} TFLOP/s from --peak-tflops"
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"no bf16 peak known for device type '{device.type}'; pass --peak-tflops to get MFU"
    name = torch.cuda.get_device_name(device)
    if "MIG" in name:
        return None, f"'{name}' is a MIG slice whose share of the peak is unknown; pass --peak-tflops"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"'{name}' matched '{key}': dense bf16 peak {tflops:g} TFLOP/s"
    return None, f"unknown GPU '{name}' (not in core.mfu.PEAK_BF16_TFLOPS); pass --peak-tflops"


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    """The lm_head row count: vocab rounded up to a multiple of 128 (50257 -> 50304), as the record does."""
    return multiple * math.ceil(vocab_size / multiple)


def mean_attended_keys(seq_len: int, window_tokens: int, block_size: int = 128) -> float:
    """Average number of keys a query attends under causal masking with a sliding window.

    Block-granular, as the record's FlexAttention block masks are: a query in block b attends every
    key of blocks max(0, b - W + 1) .. b-1 and the keys up to itself in block b, with
    W = window_tokens // block_size blocks. `block_size=1` is the plain token window
    (keys t-W+1 .. t). Document boundaries are ignored (each query sees the whole window back to the
    sequence start), so this is an upper bound for document-causal masks.
    """
    if seq_len < 1 or block_size < 1:
        raise ValueError("seq_len and block_size must be >= 1")
    if window_tokens < block_size:
        raise ValueError(f"window of {window_tokens} tokens is shorter than one {block_size}-token block")
    W = window_tokens // block_size
    total = 0
    for b in range(math.ceil(seq_len / block_size)):
        q = min(block_size, seq_len - b * block_size)  # queries in this block
        full = min(W - 1, b) * block_size  # keys in earlier blocks of the window
        total += q * full + q * (q + 1) // 2  # plus the causal triangle of the diagonal block
    return total / seq_len


def flops_per_token(
    *,
    depth: int,
    width: int,
    head_dim: int,
    vocab_size: int,
    attn_layers: list[bool],
    window_tokens: list[int],
    seq_len: int,
    mlp_ratio: int = 4,
    attn_block_size: int = 128,
) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per token of the speedrun GPT.

    Forward terms per token (2 FLOPs per multiply-accumulate):
    - attention projections, per layer with attention: qkv 2*d*(3*h*hd) and output 2*(h*hd)*d,
      with h = width // head_dim heads;
    - attention scores and values, per layer with attention: 2*2*h*hd*k, k = `mean_attended_keys`
      of that layer's window (q.k^T and p@v each take hd MACs per head per attended key);
    - MLP: 2 * 2 * d * (mlp_ratio*d) (up and down projections);
    - lm_head: 2 * d * padded_vocab(vocab_size);
    - embeddings and value embeddings are lookups: 0.
    `window_tokens[i]` is ignored where `attn_layers[i]` is False. Use the windows of the step
    being measured (the long window grows during training; short = long / 2).
    """
    if len(attn_layers) != depth or len(window_tokens) != depth:
        raise ValueError(f"attn_layers ({len(attn_layers)}) and window_tokens ({len(window_tokens)}) "
                         f"need one entry per layer (depth={depth})")
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
    d, hd = width, head_dim
    h = d // hd
    fwd = 0.0
    for has_attn, window in zip(attn_layers, window_tokens):
        if has_attn:
            fwd += 2 * d * 3 * h * hd + 2 * h * hd * d
            fwd += 2 * 2 * h * hd * mean_attended_keys(seq_len, window, attn_block_size)
        fwd += 2 * 2 * d * mlp_ratio * d
    fwd += 2 * d * padded_vocab(vocab_size)
    return 3.0 * fwd


def mfu(tokens_per_second: float, flops_per_token: float, peak: float, num_devices: int = 1) -> float:
    """Fraction of peak reached: tokens/s (over all devices) x FLOPs/token / (peak per device x devices)."""
    if peak <= 0 or num_devices < 1:
        raise ValueError("peak must be positive and num_devices >= 1")
    return tokens_per_second * flops_per_token / (peak * num_devices)
