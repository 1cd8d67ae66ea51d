"""Tests of core/fp8.py: the nanogpt::mm custom ops (opcheck, accuracy, gradients, torch.compile) and
resolve_fp8_mode. CPU by default (torch 2.13 runs torch._scaled_mm on CPU); CUDA cases are marked gpu."""
import math

import pytest
import torch
import torch.nn.functional as F

import core.fp8 as fp8
from core.fp8 import fp8_linear, resolve_fp8_mode

# Tolerances come from the formats, not from the code under test:
# e4m3 keeps 3 mantissa bits, so rounding one value is off by at most u4 = 2^-4 relative; a product
# of two rounded values by at most (1+u4)^2 - 1 < 2*u4 + u4^2. e5m2 keeps 2 bits: u5 = 2^-3, and a
# gradient product (e5m2 x e4m3) is off by at most (1+u5)(1+u4) - 1. A sum of such products with
# independent errors has a relative (Frobenius) error well inside the per-product bound.
U4, U5 = 2.0 ** -4, 2.0 ** -3
FWD_TOL = (1 + U4) ** 2 - 1          # 0.129
BWD_TOL = (1 + U5) * (1 + U4) - 1    # 0.195
BF16_TOL = 2.0 ** -8                 # bf16 output rounding (8 significant bits)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def lm_head_like(M=2 * 24, K=64, N=48, seed=0):
    """Inputs shaped and scaled like the model's lm_head: RMS-normed x, small weights, the reference scales."""
    g = torch.Generator().manual_seed(seed)
    x = F.rms_norm(torch.randn(2, M // 2, K, generator=g), (K,))
    w = torch.randn(N, K, generator=g) * (0.5 / math.sqrt(K))
    x_s, w_s = math.sqrt(K) / 448, 24 / 448  # |x| <= sqrt(K) after RMS norm: worst case maps to 448
    grad_s = 2.0 ** -4  # gradients below are N(0,1): /grad_s stays far below e5m2's max 57344
    return x, w, x_s, w_s, grad_s


def test_opcheck_mm():
    x, w, x_s, w_s, grad_s = lm_head_like()
    x2 = x.reshape(-1, x.shape[-1]).contiguous().requires_grad_()
    torch.library.opcheck(torch.ops.nanogpt.mm.default, (x2, w.clone().requires_grad_(), x_s, w_s, grad_s))


def test_opcheck_mm_backward():
    x, w, x_s, w_s, grad_s = lm_head_like()
    _, x_bits, w_bits = torch.ops.nanogpt.mm(x.reshape(-1, x.shape[-1]).contiguous(), w, x_s, w_s, grad_s)
    assert x_bits.dtype == w_bits.dtype == torch.uint8
    g = torch.randn(x_bits.shape[0], w.shape[0]).bfloat16()
    torch.library.opcheck(torch.ops.nanogpt.mm_backward.default, (g, x_bits, w_bits, x_s, w_s, grad_s))


@pytest.mark.parametrize("mode", ["fp8", "emulated", "off"])
def test_fp8_linear_shape_and_dtype(mode):
    x, w, x_s, w_s, grad_s = lm_head_like()
    out = fp8_linear(x, w, x_s, w_s, grad_s, mode)
    assert out.shape == x.shape[:-1] + (w.shape[0],)
    assert out.dtype == {"fp8": torch.bfloat16, "emulated": torch.float32, "off": x.dtype}[mode]


def test_forward_within_fp8_tolerance_of_fp32():
    x, w, x_s, w_s, grad_s = lm_head_like()
    ref = x @ w.T
    out = fp8_linear(x, w, x_s, w_s, grad_s, "fp8").float()
    emu = fp8_linear(x, w, x_s, w_s, grad_s, "emulated")
    err = rel(out, ref)
    assert 1e-3 < err < FWD_TOL, err  # and > 1e-3: the values really went through FP8
    assert rel(emu, ref) < FWD_TOL
    # Same quantisation, different matmul: the real op and its emulation differ only by bf16 output rounding.
    assert rel(out, emu) < BF16_TOL
    torch.testing.assert_close(fp8_linear(x, w, x_s, w_s, grad_s, "off"), ref)


def _grads(x, w, g, mode, x_s, w_s, grad_s):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = fp8_linear(x, w, x_s, w_s, grad_s, mode) if mode != "fp32" else x @ w.T
    out.float().backward(g)
    return x.grad, w.grad


def test_gradients_within_fp8_tolerance_of_fp32():
    x, w, x_s, w_s, grad_s = lm_head_like()
    # bf16-exact gradient: the fp8 op's output is bf16, so its incoming gradient is rounded to bf16
    # before e5m2; a bf16-exact g makes that rounding a no-op and the emulation comparable bit for bit.
    g = torch.randn(*x.shape[:-1], w.shape[0]).bfloat16().float()
    rgx, rgw = _grads(x, w, g, "fp32", x_s, w_s, grad_s)
    fgx, fgw = _grads(x, w, g, "fp8", x_s, w_s, grad_s)
    egx, egw = _grads(x, w, g, "emulated", x_s, w_s, grad_s)
    assert fgx.dtype == x.dtype and fgw.dtype == w.dtype and fgw.shape == w.shape
    for got, ref in ((fgx, rgx), (fgw, rgw), (egx, rgx), (egw, rgw)):
        assert 1e-3 < rel(got, ref) < BWD_TOL, rel(got, ref)
    assert rel(fgx, egx) < BF16_TOL          # grad_x leaves the op in bf16
    assert rel(fgw, egw) < 1e-6              # grad_w leaves it in fp32: same numbers


def test_emulated_uses_the_given_grad_scale():
    # A grad_s so large that every gradient flushes to zero in e5m2 must zero the gradients: proof that
    # the backward really quantises with grad_s (and that grad_s is read per call, not cached).
    x, w, x_s, w_s, _ = lm_head_like()
    g = torch.randn(*x.shape[:-1], w.shape[0]) * 1e-3
    for mode in ("fp8", "emulated"):
        gx, gw = _grads(x, w, g, mode, x_s, w_s, 1e6)
        assert gx.abs().max() == 0 and gw.abs().max() == 0, mode
        gx, gw = _grads(x, w, g, mode, x_s, w_s, 2.0 ** -12)
        assert gx.abs().max() > 0 and gw.abs().max() > 0, mode


def test_torch_compile_fullgraph_on_cpu():
    # One compiled function through both FP8 paths (one compile keeps the test cheap on 2 cores).
    x, w, x_s, w_s, grad_s = lm_head_like(M=16, K=32, N=16)

    def loss_fn(x, w):
        a = fp8_linear(x, w, x_s, w_s, grad_s, "fp8").float().square().sum()
        b = fp8_linear(x, w, x_s, w_s, grad_s, "emulated").square().sum()
        return a, b

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        w_ = w.clone().requires_grad_()
        a, b = fn(x, w_)
        ga, = torch.autograd.grad(a, w_, retain_graph=True)
        gb, = torch.autograd.grad(b, w_)
        results.append((a.detach(), b.detach(), ga, gb))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same math, only fusion order differs


def test_fp8_linear_rejects_unknown_mode():
    x, w, x_s, w_s, grad_s = lm_head_like()
    with pytest.raises(ValueError, match="emulated"):
        fp8_linear(x, w, x_s, w_s, grad_s, "fast")


# -----------------------------------------------------------------------------
# resolve_fp8_mode

def _scaled_mm_works_on_cpu() -> bool:
    """Independent check (not via core.fp8) of whether this torch runs FP8 _scaled_mm on CPU."""
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        one = torch.tensor(1.0)
        torch._scaled_mm(a, a.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return True
    except Exception:
        return False


@pytest.fixture
def fresh_probe():
    fp8._probe.cache_clear()
    yield
    fp8._probe.cache_clear()


def test_resolve_fp8_mode_on_cpu(fresh_probe):
    cpu = torch.device("cpu")
    mode, reason = resolve_fp8_mode("auto", cpu)
    assert mode == "off" and "CUDA" in reason
    assert resolve_fp8_mode("off", cpu)[0] == "off"
    assert resolve_fp8_mode(" ON ", cpu)[0] == ("fp8" if _scaled_mm_works_on_cpu() else "emulated")
    for bad in ("true", "fp8", ""):
        with pytest.raises(ValueError, match=r"\['auto', 'on', 'off'\]"):
            resolve_fp8_mode(bad, cpu)


def test_resolve_fp8_mode_falls_back_to_emulation(fresh_probe, monkeypatch):
    def unsupported(*a, **k):
        raise RuntimeError("_scaled_mm is not supported on this device")
    monkeypatch.setattr(torch, "_scaled_mm", unsupported)
    mode, reason = resolve_fp8_mode("on", torch.device("cpu"))
    assert mode == "emulated" and "not supported on this device" in reason


def test_resolve_fp8_mode_auto_cuda_branches(fresh_probe, monkeypatch):
    # Without a GPU, pretend to be one: an sm_80 (A100) has no FP8, an sm_90 whose probe fails gets "off".
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    mode, reason = resolve_fp8_mode("auto", torch.device("cuda"))
    assert mode == "off" and "8.0" in reason
    assert fp8.fallback_warning("auto", mode, torch.device("cuda")) is None  # no FP8 hardware: expected
    with pytest.raises(fp8.FP8Unavailable, match="8.0 < 8.9"):  # --fp8 on where it cannot work: an error
        resolve_fp8_mode("on", torch.device("cuda"))
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        mode, reason = resolve_fp8_mode("auto", torch.device("cuda"))
        assert mode == "off" and "failed" in reason
        warning = fp8.fallback_warning("auto", mode, torch.device("cuda"))  # FP8 hardware, failing probe: loud
        assert warning.startswith("WARNING") and "9.0" in warning and "--fp8 off" in warning
        assert fp8.fallback_warning("off", "off", torch.device("cuda")) is None  # the user's own choice
        with pytest.raises(fp8.FP8Unavailable, match="cannot run"):
            resolve_fp8_mode("on", torch.device("cuda"))


# -----------------------------------------------------------------------------
# CUDA (skipped without a GPU)

@pytest.mark.gpu
def test_cuda_fp8_path():
    dev = torch.device("cuda")
    fp8._probe.cache_clear()
    mode, reason = resolve_fp8_mode("auto", dev)
    if torch.cuda.get_device_capability(dev) < (8, 9):
        assert mode == "off"
        pytest.skip(f"GPU without FP8 tensor cores: {reason}")
    assert mode == "fp8", reason
    x, w, x_s, w_s, grad_s = lm_head_like(M=256, K=128, N=512)
    x, w = x.to(dev).bfloat16(), w.to(dev)
    x2 = x.reshape(-1, 128).contiguous().requires_grad_()
    torch.library.opcheck(torch.ops.nanogpt.mm.default, (x2, w.clone().requires_grad_(), x_s, w_s, grad_s))
    g = torch.randn(*x.shape[:-1], w.shape[0], device=dev).bfloat16().float()
    out = fp8_linear(x, w, x_s, w_s, grad_s, "fp8")
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), x.float() @ w.T) < FWD_TOL
    rgx, rgw = _grads(x.float(), w, g, "fp32", x_s, w_s, grad_s)
    fgx, fgw = _grads(x, w, g, "fp8", x_s, w_s, grad_s)
    assert rel(fgx.float(), rgx) < BWD_TOL and rel(fgw, rgw) < BWD_TOL
    with pytest.raises(ValueError, match="divisible by 16"):
        fp8_linear(x[:, :3], w, x_s, w_s, grad_s, "fp8")
