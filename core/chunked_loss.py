"""The readout, the soft-cap and the cross-entropy in row chunks: never the full (T, V) fp32 logits (issue 21).

    loss = CE(softcap * sigmoid(z / divisor), targets),   z = readout.project(x)   # (T, C) -> (T, V) fp32

summed (or averaged) over the T tokens, with `readout.project` the lm_head exactly as the model applies it
(core/model.py `Readout.project`: the FP8 custom op or a plain matmul, fp32 out, times the muP output
multiplier) and `softcap`, `divisor` the model's (core/mup.py `softcap_divisor`).

Why. The unchunked path (the record's) keeps several (T, V) fp32 tensors at once: z, z / divisor, the sigmoid,
30 x sigmoid, the log-softmax and their gradients; at the record's 49,152 x 50,304 each is 9.9 GB, ~40 GB in
an eager step (coordinate-check and activation-monitor steps run the eager module), more than an 80 GB H100
holds with the eager activations (issue 21, finding 1). Here the forward runs `rows` tokens at a time without
autograd and saves only x (T, C), the weight and the targets; the backward recomputes one chunk's logits with
autograd, backpropagates it at once and drops it, so at most one chunk of logits and their gradients exists
at any time. grad_x rows go into one (T, C) tensor, grad_w accumulates into one (V, C) tensor.

Cost: the readout's forward runs twice (forward and recompute in the backward): 4 readout matmuls instead of
3, and the element-wise soft-cap / log-softmax passes once more (bench/step_bench.py --chunked-loss measures it).

Numerics: per element the same expressions as the unchunked path, so the loss and every gradient agree up to
the order of the sums over chunks (tests/test_chunked_loss.py, fp32 tolerance; float64 golden curves). FP8: the
e5m2 quantisation of the output gradient is per element with a fixed scale (core/fp8.py), so a chunk's
gradient is quantised exactly as its rows are in the whole tensor.

torch.compile: `chunked_softcap_cross_entropy` is `torch.compiler.disable`d, so inside a compiled model it is a
graph break: the trunk stays one compiled graph and the readout runs as this eager loop (Dynamo would unroll
the loop into a graph of hundreds of chunks at the 262k-token validation). Where it is used is decided by
`resolve_loss_paths` (the trainer logs the sentence it returns).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_BYTES = 256 * 2**20  # one chunk's fp32 logits at most this big: 1280 rows at the 50,304 padded vocabulary
ROW_MULTIPLE = 128         # chunk rows a multiple of this (FP8 on CUDA needs multiples of 16)
IGNORE_INDEX = -100        # F.cross_entropy's default, kept so that "mean" divides by the same count
MODES = ("auto", "on", "off")


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one chunk's fp32 logits fit CHUNK_BYTES (at least ROW_MULTIPLE rows)."""
    return max(ROW_MULTIPLE, CHUNK_BYTES // (4 * vocab) // ROW_MULTIPLE * ROW_MULTIPLE)


def _chunk_loss(readout, x: Tensor, weight: Tensor, targets: Tensor, softcap: float, divisor: float,
                observe: bool = False, first: bool = False, last: bool = False) -> Tensor:
    """Summed cross-entropy of one chunk of rows: x (N, C), targets (N,)."""
    z = readout.project(x, weight)  # (N, V) fp32, times the muP output multiplier
    if observe:  # the coordinate check and the activation monitor see every chunk of z (forward only)
        readout.notify(z, first, last)
    logits = softcap * torch.sigmoid(z / divisor)
    return F.cross_entropy(logits, targets, reduction="sum")


def _bounds(n: int, rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + rows, n)) for s in range(0, n, rows)]


def _forward_chunks(readout, x, weight, targets, softcap, divisor, rows) -> Tensor:
    """Sum of the chunks' summed losses (no autograd graph is kept)."""
    bounds = _bounds(x.size(0), rows)
    total = None
    for i, (s, e) in enumerate(bounds):
        part = _chunk_loss(readout, x[s:e], weight, targets[s:e], softcap, divisor,
                           observe=True, first=i == 0, last=i == len(bounds) - 1)
        total = part if total is None else total + part
    return total


class _ChunkedSoftcapCE(torch.autograd.Function):
    """Summed soft-capped cross-entropy; the backward recomputes each chunk (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, readout, softcap: float, divisor: float,
                rows: int, count: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, targets)
        ctx.readout, ctx.softcap, ctx.divisor, ctx.rows, ctx.count = readout, softcap, divisor, rows, count
        total = _forward_chunks(readout, x, weight, targets, softcap, divisor, rows)
        return total if count is None else total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        x, weight, targets = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        # d(loss)/d(chunk sum): the incoming gradient ("sum"), over the count of targets ("mean")
        g = grad_loss if ctx.count is None else grad_loss / ctx.count
        for s, e in _bounds(x.size(0), ctx.rows):
            with torch.enable_grad():
                xc = x[s:e].detach().requires_grad_(need_x)
                w = weight.detach().requires_grad_(need_w)
                loss = _chunk_loss(ctx.readout, xc, w, targets[s:e], ctx.softcap, ctx.divisor)
                wanted = [t for t, need in ((xc, need_x), (w, need_w)) if need]
                grads = list(torch.autograd.grad(loss, wanted, grad_outputs=g))
            if need_x:
                grad_x[s:e] = grads.pop(0)
            if need_w:
                grad_w += grads.pop(0)
        return grad_x, grad_w, None, None, None, None, None, None


@torch.compiler.disable
def chunked_softcap_cross_entropy(x: Tensor, readout, targets: Tensor, softcap: float, divisor: float,
                                  reduction: str = "sum", rows: int | None = None) -> Tensor:
    """CE(softcap * sigmoid(readout.project(x) / divisor), targets) over x (T, C), targets (T,), `rows` at a time.

    `readout` is the model's lm_head (core/model.py `Readout`: `.weight`, `.project(x, weight)`,
    `.notify(z, first, last)`); `reduction` "sum" or "mean" as F.cross_entropy's. Without autograd
    (validation) the chunks are summed and nothing is saved; with it, see `_ChunkedSoftcapCE`.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if x.ndim != 2 or targets.shape != x.shape[:1]:
        raise ValueError(f"x must be (T, C) and targets (T,), got {tuple(x.shape)} and {tuple(targets.shape)}")
    weight = readout.weight
    rows = rows or default_chunk_rows(weight.size(0))
    # "mean" divides by the targets that count, as F.cross_entropy does (a device tensor: no host sync)
    count = (targets != IGNORE_INDEX).sum() if reduction == "mean" else None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedSoftcapCE.apply(x, weight, targets, readout, softcap, divisor, rows, count)
    with torch.no_grad():
        total = _forward_chunks(readout, x, weight, targets, softcap, divisor, rows)
    return total if count is None else total / count


# ---------------------------------------------------------------------------------------------
# Where the chunked loss runs


class LossPaths(NamedTuple):
    """Which steps compute the loss in chunks."""
    train: bool    # ordinary training steps (compiled or not)
    eager: bool    # eager measuring steps: coordinate check (--coord-check), activation monitor
    val: bool      # validation
    reason: str    # the sentence the run log prints


def resolve_loss_paths(mode: str, compiled: bool, device_type: str) -> LossPaths:
    """`--chunked-loss auto|on|off` for a run that compiles (or not) on `device_type`.

    auto: eager measuring steps and validation in chunks (there the unchunked readout is what runs out of
    memory: issue 21); ordinary training steps as the record (unchunked). Compiled training on CUDA keeps the
    record's path because the chunked one was never measured there: it is a graph break, and inductor fuses
    the unchunked soft-cap and cross-entropy into two kernels, which the eager chunks may not match. On a CPU
    bench/step_bench.py measured the chunked step 1.25x slower eager and 2.2x slower compiled (README
    "Readout memory: the chunked loss"), so auto keeps the unchunked one there too. Validation in chunks
    costs a CPU compiled run 2.3x on its validation pass (eager chunks instead of inductor's fused pass);
    `off` brings the fused pass back.
    """
    mode = str(mode).strip().lower()
    if mode not in MODES:
        raise ValueError(f"--chunked-loss must be one of {list(MODES)}, got {mode!r}")
    if mode == "on":
        return LossPaths(True, True, True, "on: every step and validation in row chunks (core/chunked_loss.py)")
    if mode == "off":
        return LossPaths(False, False, False, "off: the record's unchunked readout everywhere (eager steps at "
                                              "the record's batch may run out of memory: issue 21)")
    where = ("compiled CUDA training keeps the record's fused path (the chunked one is not measured on a GPU)"
             if compiled and device_type == "cuda" else
             f"{'compiled' if compiled else 'eager'} {device_type} training keeps the unchunked path "
             "(measured faster on a CPU: bench/step_bench.py --chunked-loss)")
    return LossPaths(False, True, True, f"auto: eager measuring steps and validation in row chunks; {where}")
