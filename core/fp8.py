"""FP8 matmul for the lm_head: the `nanogpt::mm` custom op, its emulation, and choosing between them.

Owns:
- custom ops `nanogpt::mm` (forward) and `nanogpt::mm_backward`, with fake (meta) kernels and
  autograd, so torch.compile treats the FP8 matmul as one opaque node (fullgraph works);
- `resolve_fp8_mode(requested, device) -> (mode, reason)`: "auto" | "on" | "off" -> "fp8" |
  "emulated" | "off", with a sentence for the run log;
- `fp8_linear(x, w, x_s, w_s, grad_s, mode)`: `x @ w.T` through the chosen path.

The op follows @YouJiacheng's FP8 lm_head of the modded-nanogpt record
`records/track_1_short/2025-07-12_BosAlign` (read for facts, code written here):
forward `out = (x/x_s in e4m3) @ (w/w_s in e4m3).T * x_s * w_s` with torch._scaled_mm (bf16
output, fast accumulation); backward quantises the output gradient to e5m2 with scale grad_s
(e5m2 trades mantissa for range, as gradients need) and computes grad_x in bf16 and grad_w in
fp32 from the saved FP8 copies of x and w. Scales are plain floats given at every call: they are
worst-case bounds (|x/x_s| and |w/w_s| <= 448, e4m3's largest value) chosen by the caller, and
muP may change grad_s with width, so nothing is cached. Out of range: e4m3fn has no infinity and
eager torch 2.13 saturates the cast at +-448 (measured on CPU), while e5m2 overflows to inf above
57344, so a grad_s that is too small shows up as inf/NaN gradients; too large a scale instead
flushes small values to zero (e4m3's smallest subnormal is 2^-9, e5m2's 2^-16).

Devices: CUDA needs compute capability >= 8.9 (Ada, Hopper) and every dim a multiple of 16
(cuBLASLt); there the two kernels are torch.compile'd on first use (fusing the scale-and-cast).
On CPU, torch 2.13's `_scaled_mm` works for these dtypes (eager), which the tests exercise.
Registering the ops at import touches no device.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from core.config import ConfigError

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MODES = ("fp8", "emulated", "off")
REQUESTS = ("auto", "on", "off")

# -----------------------------------------------------------------------------
# The kernels, written once and used eagerly (CPU, probe) or compiled (CUDA)


def _mm_forward(x: Tensor, w: Tensor, x_s: float, w_s: float) -> tuple[Tensor, Tensor, Tensor]:
    x_f8 = x.div(x_s).to(E4M3)
    w_f8 = w.div(w_s).to(E4M3)
    # cuBLASLt wants mat1 row-major and mat2 column-major (w_f8.T is). Fast accumulation in the
    # forward only, as the reference; the backward accumulates in full precision.
    out = torch._scaled_mm(x_f8, w_f8.T, out_dtype=torch.bfloat16,
                           scale_a=x.new_tensor(x_s, dtype=torch.float32),
                           scale_b=x.new_tensor(w_s, dtype=torch.float32),
                           use_fast_accum=True)
    return out, x_f8, w_f8


def _mm_backward(g: Tensor, x_f8: Tensor, w_f8: Tensor, x_s: float, w_s: float,
                 grad_s: float) -> tuple[Tensor, Tensor]:
    x_scale = g.new_tensor(x_s, dtype=torch.float32)
    w_scale = g.new_tensor(w_s, dtype=torch.float32)
    g_scale = g.new_tensor(grad_s, dtype=torch.float32)
    g_f8 = g.div(grad_s).to(E5M2)
    # (M, N) @ (N, K): w_f8 is (N, K) row-major; .T.contiguous().T makes the column-major copy cuBLASLt needs.
    grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, out_dtype=torch.bfloat16,
                              scale_a=g_scale, scale_b=w_scale, use_fast_accum=False)
    # grad_w^T = x^T @ g as (K, M) @ (M, N), then transposed back: the reference found this faster
    # than g^T @ x for the (50304, 768) lm_head.
    grad_w = torch._scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, out_dtype=torch.float32,
                              scale_a=x_scale, scale_b=g_scale, use_fast_accum=False).T
    return grad_x, grad_w


_compiled: dict[str, object] = {}  # torch.compile'd kernels for CUDA, created on first use


def _on_device(name: str, fn, t: Tensor):
    if not t.is_cuda:
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


# -----------------------------------------------------------------------------
# Custom ops: nanogpt::mm and nanogpt::mm_backward

def _check_2d(x: Tensor, w: Tensor) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"nanogpt::mm needs x (M, K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}; "
                         "call fp8_linear, which flattens the leading dims")
    if not (x.is_contiguous() and w.is_contiguous()):
        raise ValueError("nanogpt::mm needs contiguous x and w (call .contiguous(); fp8_linear does)")


# The e4m3 copies of x and w that the backward needs leave the forward op as their uint8 bit
# patterns (a free dtype view): integer outputs are non-differentiable by construction, and torch's
# op checkers (opcheck: schema and AOT-autograd tests) can compare and sum uint8 tensors on CPU
# but not float8 ones.
@torch.library.custom_op("nanogpt::mm", mutates_args=())
def mm_op(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, K) @ w.T (K, N) in FP8 -> (out bf16 (M, N), x as e4m3 bits (uint8), w as e4m3 bits (uint8))."""
    _check_2d(x, w)
    out, x_f8, w_f8 = _on_device("fwd", _mm_forward, x)(x, w, x_s, w_s)
    return out, x_f8.view(torch.uint8), w_f8.view(torch.uint8)  # free bit-casts, outside the compiled kernel


@mm_op.register_fake
def _(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float):
    _check_2d(x, w)
    return (x.new_empty((x.shape[0], w.shape[0]), dtype=torch.bfloat16),
            torch.empty_like(x, dtype=torch.uint8), torch.empty_like(w, dtype=torch.uint8))


@torch.library.custom_op("nanogpt::mm_backward", mutates_args=())
def mm_backward_op(g: Tensor, x_bits: Tensor, w_bits: Tensor, x_s: float, w_s: float,
                   grad_s: float) -> tuple[Tensor, Tensor]:
    """Gradients of nanogpt::mm: (grad_x bf16 (M, K), grad_w fp32 (N, K), column-major) from g (M, N)."""
    if not g.is_contiguous():
        raise ValueError("nanogpt::mm_backward needs a contiguous gradient (call .contiguous())")
    return _on_device("bwd", _mm_backward, g)(g, x_bits.view(E4M3), w_bits.view(E4M3), x_s, w_s, grad_s)


@mm_backward_op.register_fake
def _(g: Tensor, x_bits: Tensor, w_bits: Tensor, x_s: float, w_s: float, grad_s: float):
    grad_x = x_bits.new_empty(x_bits.shape, dtype=torch.bfloat16)
    grad_w = w_bits.new_empty((w_bits.shape[1], w_bits.shape[0]), dtype=torch.float32).T  # the real one is a transpose
    return grad_x, grad_w


def _mm_setup_context(ctx, inputs, output):
    x, w, x_s, w_s, grad_s = inputs
    _, x_bits, w_bits = output
    ctx.save_for_backward(x_bits, w_bits)  # FP8 copies: a quarter of the memory of fp32 activations
    ctx.scales = (x_s, w_s, grad_s)
    ctx.dtypes = (x.dtype, w.dtype)
    ctx.set_materialize_grads(False)


def _mm_autograd_backward(ctx, grad_out, *_unused_fp8_grads):
    if grad_out is None:
        return None, None, None, None, None
    x_bits, w_bits = ctx.saved_tensors
    grad_x, grad_w = torch.ops.nanogpt.mm_backward(grad_out.contiguous(), x_bits, w_bits, *ctx.scales)
    x_dtype, w_dtype = ctx.dtypes
    return grad_x.to(x_dtype), grad_w.to(w_dtype), None, None, None


mm_op.register_autograd(_mm_autograd_backward, setup_context=_mm_setup_context)


# -----------------------------------------------------------------------------
# Emulation: the same quantisation, matmuls in fp32 (any device, any shape)

class _EmulatedFP8Matmul(torch.autograd.Function):
    """x @ w.T with x, w round-tripped through e4m3 and the output gradient through e5m2, exactly as
    nanogpt::mm quantises them (same expressions, same scales), but with fp32 matmuls. Output fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> Tensor:
        x_f8 = x.div(x_s).to(E4M3)
        w_f8 = w.div(w_s).to(E4M3)
        ctx.save_for_backward(x_f8, w_f8)
        ctx.scales = (x_s, w_s, grad_s)
        ctx.dtypes = (x.dtype, w.dtype)
        return (x_f8.float() @ w_f8.float().T) * (x_s * w_s)

    @staticmethod
    def backward(ctx, g: Tensor):
        x_f8, w_f8 = ctx.saved_tensors
        x_s, w_s, grad_s = ctx.scales
        g_q = g.div(grad_s).to(E5M2).float()
        grad_x = (g_q @ w_f8.float()) * (grad_s * w_s)
        grad_w = (g_q.T @ x_f8.float()) * (grad_s * x_s)
        x_dtype, w_dtype = ctx.dtypes
        return grad_x.to(x_dtype), grad_w.to(w_dtype), None, None, None


# -----------------------------------------------------------------------------
# Public API

def fp8_linear(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float, mode: str) -> Tensor:
    """`x @ w.T` for x (..., K) and w (N, K) -> (..., N), through the path `mode` names.

    mode "fp8": nanogpt::mm (bf16 output); "emulated": FP8 round-trip with fp32 matmuls (fp32
    output); "off": a plain matmul in x's dtype. Get `mode` from resolve_fp8_mode. Callers that
    need fp32 logits call .float() on the result.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if mode == "fp8":
        if x.is_cuda and any(n % 16 for n in (x2.shape[0], x2.shape[1], w.shape[0])):
            raise ValueError(f"FP8 on CUDA needs tokens, in_features and out_features divisible by 16, got "
                             f"{x2.shape[0]}, {x2.shape[1]}, {w.shape[0]}: pad them, or run with --fp8 off")
        out = torch.ops.nanogpt.mm(x2.contiguous(), w.contiguous(), x_s, w_s, grad_s)[0]
    elif mode == "emulated":
        out = _EmulatedFP8Matmul.apply(x2, w, x_s, w_s, grad_s)
    elif mode == "off":
        out = F.linear(x2, w.type_as(x2))
    else:
        raise ValueError(f"fp8_linear: unknown mode {mode!r}; valid modes are {list(FP8_MODES)} "
                         "(get one from resolve_fp8_mode)")
    return out.view(*lead, w.shape[0])


@functools.lru_cache(maxsize=None)
def _probe(device_str: str) -> str | None:
    """Run both FP8 kernels once on a tiny input; None if they work, else the error (cached per device)."""
    device = torch.device(device_str)
    try:
        x = torch.randn(16, 32, device=device)
        w = torch.randn(16, 32, device=device)
        out, x_f8, w_f8 = _mm_forward(x, w, 1.0, 1.0)
        _mm_backward(out.contiguous(), x_f8, w_f8, 1.0, 1.0, 1.0)
        if not torch.isfinite(out.float()).all():
            return "torch._scaled_mm returned non-finite values"
    except Exception as e:  # any failure means "not supported here"; the reason goes to the log
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


class FP8Unavailable(ConfigError):
    """--fp8 on was asked for on a GPU where the FP8 matmul cannot run (a bad-input error: exit 2)."""


def resolve_fp8_mode(requested: str, device: torch.device) -> tuple[str, str]:
    """Turn the user's --fp8 value into the lm_head matmul mode and a sentence saying why.

    - "auto": "fp8" on CUDA with compute capability >= 8.9 (Ada/Hopper: FP8 tensor cores) when the
      probe passes; otherwise "off" (a plain matmul in the model's dtype: faster than emulating).
      A failing probe on such a GPU is not expected (the record runs FP8 there): `fallback_warning`
      turns that case into a loud warning at start.
    - "on": "fp8" wherever torch._scaled_mm works on `device` (probed once with a tiny matmul,
      CPU included in torch 2.13). On CPU, otherwise "emulated" (same FP8 rounding, fp32 matmuls),
      so the numerics of FP8 training can be studied on any machine. On CUDA, a GPU below compute
      capability 8.9 or a failing probe raises FP8Unavailable: a run that asked for FP8 on a GPU must
      not silently train an emulation at a fraction of the speed.
    - "off": "off".
    """
    req = str(requested).strip().lower()
    if req not in REQUESTS:
        raise ValueError(f"--fp8 must be one of {list(REQUESTS)}, got {requested!r}")
    device = torch.device(device)
    if req == "off":
        return "off", "FP8 off as requested: lm_head uses a plain matmul in the model dtype"
    if req == "auto":
        if device.type != "cuda":
            return "off", (f"auto: device is {device.type}, not CUDA; FP8 tensor cores need an NVIDIA GPU with "
                           "compute capability >= 8.9, so lm_head uses a plain matmul (--fp8 on emulates FP8)")
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return "off", (f"auto: GPU compute capability {cap[0]}.{cap[1]} < 8.9 has no FP8 tensor cores, "
                           "lm_head uses a plain matmul")
        err = _probe(str(device))
        if err is None:
            return "fp8", f"auto: GPU compute capability {cap[0]}.{cap[1]} >= 8.9, torch._scaled_mm works"
        return "off", f"auto: torch._scaled_mm failed on {device} ({err}), lm_head uses a plain matmul"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        err = (f"compute capability {cap[0]}.{cap[1]} < 8.9 has no FP8 tensor cores" if cap < (8, 9)
               else _probe(str(device)))
        if err is not None:
            raise FP8Unavailable(f"--fp8 on: the FP8 lm_head cannot run on {device} ({err}). Use --fp8 auto (falls "
                                 "back to a plain matmul with a warning) or --fp8 off.")
        return "fp8", f"on: GPU compute capability {cap[0]}.{cap[1]} >= 8.9, torch._scaled_mm works (probed)"
    err = _probe(str(device))
    if err is None:
        return "fp8", f"on: torch._scaled_mm works on {device} (probed)"
    return "emulated", (f"on: torch._scaled_mm does not work on {device} ({err}); emulating FP8 "
                        "(e4m3/e5m2 round-trip with the same scales, fp32 matmuls)")


def fallback_warning(requested: str, mode: str, device: torch.device) -> str | None:
    """A warning for the start of the run when `--fp8 auto` fell back to "off" on a GPU that has FP8 tensor
    cores (the probe failed: a driver, cuBLASLt or torch build problem, not the hardware): the run is then
    slower than the record and its lm_head numerics differ. None in every expected case."""
    device = torch.device(device)
    if str(requested).strip().lower() != "auto" or mode != "off" or device.type != "cuda":
        return None
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return None  # no FP8 hardware: "off" is the only choice, and the log line says so
    return (f"WARNING: --fp8 auto: this GPU (compute capability {cap[0]}.{cap[1]}) has FP8 tensor cores but the "
            f"FP8 probe failed ({_probe(str(device))}); the lm_head runs a plain bf16 matmul, unlike the record. "
            "Fix the CUDA/torch install, or pass --fp8 off to silence this.")


def grad_scale_for_accumulation(grad_s: float, grad_accum: int) -> float:
    """The e5m2 gradient scale for a process that accumulates `grad_accum` micro-batches.

    The trainer backpropagates loss / grad_accum per micro-batch (so 1 process x A micro-batches equals A
    ranks x 1), which makes the lm_head's output gradient A times smaller than on one of the record's 8
    ranks, where the scales were tuned: e5m2 would lose log2(A) bits of headroom (3 bits on 1 GPU with the
    record's batch) and flush more entries to zero. Measured on CPU (width 64, 3 steps, 8 micro-batches):
    fp32 9.936, FP8 9.798, FP8 with grad_s / 8: 9.969. Dividing grad_s by A quantises the same values a rank
    would (g/A over grad_s/A) and scales the result back by grad_s/A: exactly the A-rank numerics.
    """
    return grad_s / grad_accum
