"""Single-process contract tests of core/optimizers.py: NS5 band, Muon update, DistAdam == the record's Adam,
build_optimizers coverage and LR multipliers, momentum warm-up."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from core.optimizers import (DistAdam, Muon, build_optimizers, polar_factor_svd, set_muon_momentum,
                             zeropower_via_newtonschulz5)

A, B, C = 3.4445, -4.7750, 2.0315  # restated from the reference record, not imported from the code
# bf16 keeps 8 significant bits (spacing 2^-7 just below 1, 2^-8 relative) and NS5 chains 15
# matmuls, so singular values may leave the exact-arithmetic band by a few bf16 steps: allow 0.03.
BF16_SLACK = 0.03


def p5(s):
    """The scalar map NS5 applies to each singular value: p(s) = a s + b s^3 + c s^5, five times."""
    for _ in range(5):
        s = A * s + B * s ** 3 + C * s ** 5
    return s


def normalised_singular_values(G):
    G = G.double()
    return torch.linalg.svdvals(G) / torch.linalg.matrix_norm(G).unsqueeze(-1)


def well_conditioned_square(n, seed):
    # Square Gaussian matrices are nearly singular (s_min ~ n^-1.5 after normalising), and rounding
    # to bf16 moves singular values by ~2^-9 of the largest, so their tiny ones are noise that no
    # band can promise; this square case has a controlled spectrum 1..10 instead.
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return U @ torch.diag(torch.linspace(1, 10, n)) @ V.T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # the CUDA path and the CPU path
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (3, 24, 48), "square64"])
def test_ns5_singular_values_lie_in_polynomial_band(shape, dtype):
    torch.manual_seed(0)
    # Gaussian matrices with aspect ratio >= 2 are well conditioned (s_min/s_max ~ 1/3).
    G = well_conditioned_square(64, 0) if shape == "square64" else torch.randn(*shape)
    X = zeropower_via_newtonschulz5(G, dtype=dtype)
    assert X.dtype == dtype and X.shape == G.shape
    s_in = normalised_singular_values(G)
    eps = s_in.min().item()
    band = p5(np.linspace(eps, 1.0, 200_001))  # what the coefficients promise on [eps, 1]
    lo, hi = band.min(), band.max()
    s_out = torch.linalg.svdvals(X.double())
    assert s_out.min() >= lo - BF16_SLACK, (s_out.min().item(), lo)
    assert s_out.max() <= hi + BF16_SLACK, (s_out.max().item(), hi)
    # Sharper: NS maps each singular value through p^5 and keeps the singular vectors, so the
    # sorted output singular values are the sorted p^5 of the input ones (up to bf16 rounding).
    predicted = torch.sort(p5(s_in), dim=-1).values
    measured = torch.sort(s_out, dim=-1).values
    assert (predicted - measured).abs().max() < 0.05
    # ...and the singular vectors survive: X is close to U p5(S) V^T.
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    target = U @ torch.diag_embed(p5(S / torch.linalg.matrix_norm(G.double()).unsqueeze(-1))) @ Vh
    assert (X.double() - target).norm() / target.norm() < 0.05


def test_ns5_runs_in_fp32_on_cpu_and_bf16_on_cuda():
    from core.optimizers import ns_dtype
    assert ns_dtype("cpu") == torch.float32 and ns_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert zeropower_via_newtonschulz5(torch.randn(16, 32)).dtype == torch.float32
    # fp32 follows the polynomial more closely than bf16 (same input, same iteration)
    G = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))
    s_in = normalised_singular_values(G)
    predicted = torch.sort(p5(s_in), dim=-1).values
    err = {dt: (torch.sort(torch.linalg.svdvals(zeropower_via_newtonschulz5(G, dtype=dt).double()), dim=-1).values
                - predicted).abs().max().item() for dt in (torch.float32, torch.bfloat16)}
    assert err[torch.float32] < 1e-4 < err[torch.bfloat16], err


def test_ns5_rejects_vectors():
    with pytest.raises(ValueError, match="DistAdam"):
        zeropower_via_newtonschulz5(torch.randn(8))


def _muon_step(shape, grads, lr=0.1, momentum=0.0, lr_mul=None, wd=0.0):
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(*shape))
    if lr_mul is not None:
        p.lr_mul = lr_mul
    start = p.detach().clone()
    opt = Muon([p], lr=lr, momentum=momentum, weight_decay=wd)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return start, p.detach().clone()


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (3, 16, 48)])
def test_muon_update_is_near_orthogonal_and_scaled(shape):
    torch.manual_seed(2)
    g = torch.randn(*shape)
    lr = 0.1
    start, end = _muon_step(shape, [g], lr=lr)
    rows, cols = shape[-2], shape[-1]
    scale = lr * math.sqrt(max(1.0, rows / cols))
    unit = (end - start).double() / -scale  # should be the NS5 polar factor of g
    s = torch.linalg.svdvals(unit)
    eps = normalised_singular_values(g).min().item()
    band = p5(np.linspace(eps, 1.0, 200_001))
    assert s.min() >= band.min() - BF16_SLACK and s.max() <= band.max() + BF16_SLACK
    # Direction: the update points along -g (positive inner product with the polar factor of g).
    assert (unit * g.double()).sum() > 0
    # The tall-matrix factor is really applied: RMS singular value ~ 1 only after dividing by sqrt(rows/cols).
    assert 0.8 < s.pow(2).mean().sqrt().item() < 1.15


def test_polar_factor_svd_is_exact_and_zero_on_zero():
    torch.manual_seed(5)
    g = torch.randn(3, 24, 40)
    q = polar_factor_svd(g)
    # semi-orthogonal (rows orthonormal for a wide matrix) and the same polar factor as (G G^T)^(-1/2) G
    torch.testing.assert_close(q @ q.mT, torch.eye(24).expand(3, 24, 24), atol=1e-5, rtol=0)
    evals, evecs = torch.linalg.eigh((g @ g.mT).double())
    inv_sqrt = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.mT
    torch.testing.assert_close(q.double(), inv_sqrt @ g.double(), atol=1e-5, rtol=0)
    assert torch.count_nonzero(polar_factor_svd(torch.zeros(8, 8))) == 0
    # rank-1 input: one unit singular value, not an arbitrary orthogonal completion
    u, v = torch.randn(16, 1), torch.randn(1, 12)
    assert torch.linalg.svdvals(polar_factor_svd(u @ v)).gt(0.5).sum() == 1


def test_muon_uses_its_orthogonalize_attribute():
    torch.manual_seed(6)
    p = nn.Parameter(torch.zeros(20, 30))
    opt = Muon([p], lr=0.1, momentum=0.0)
    opt.orthogonalize = polar_factor_svd
    g = torch.randn(20, 30)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * polar_factor_svd(g), atol=1e-6, rtol=0)


def test_muon_lr_mul_and_weight_decay():
    torch.manual_seed(3)
    g = torch.randn(48, 16)
    s0, e1 = _muon_step((48, 16), [g], lr=0.05)
    _, e2 = _muon_step((48, 16), [g], lr=0.05, lr_mul=2.0)
    torch.testing.assert_close(e2 - s0, 2 * (e1 - s0), rtol=1e-5, atol=1e-6)
    _, e3 = _muon_step((48, 16), [g], lr=0.05, wd=0.5)
    # decoupled decay first: p * (1 - lr * wd), then the same orthogonal update
    torch.testing.assert_close(e3, s0 * (1 - 0.05 * 0.5) + (e1 - s0), rtol=1e-5, atol=1e-6)


def test_muon_nesterov_momentum():
    torch.manual_seed(4)
    m, lr = 0.9, 0.02
    g1, g2 = torch.randn(24, 40), torch.randn(24, 40)
    start, end = _muon_step((24, 40), [g1, g2], lr=lr, momentum=m)
    # Hand-rolled Nesterov: buf <- m buf + (1-m) g ; input <- (1-m) g + m buf
    buf1 = (1 - m) * g1
    in1 = (1 - m) * g1 + m * buf1
    buf2 = m * buf1 + (1 - m) * g2
    in2 = (1 - m) * g2 + m * buf2
    expected = start - lr * zeropower_via_newtonschulz5(in1).float() - lr * zeropower_via_newtonschulz5(in2).float()
    torch.testing.assert_close(end, expected, rtol=1e-4, atol=1e-5)


def test_muon_single_process_makes_no_dist_call(monkeypatch):
    import torch.distributed as dist

    def boom(*a, **k):
        raise AssertionError("torch.distributed was called with world_size == 1")
    for name in ("reduce_scatter", "all_gather", "all_reduce", "is_initialized", "get_world_size"):
        monkeypatch.setattr(dist, name, boom)
    p = nn.Parameter(torch.randn(16, 16))
    q = nn.Parameter(torch.randn(16))
    p.grad, q.grad = torch.randn(16, 16), torch.randn(16)
    Muon([p]).step()
    DistAdam([q]).step()


def test_muon_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        Muon([nn.Parameter(torch.randn(4, 4))], rank=2, world_size=2)


def record_adam_step(p: torch.Tensor, g: torch.Tensor, state: dict, lr: float, betas, eps: float,
                     weight_decay: float = 0.0, wd_mul: float = 1.0) -> None:
    """The record's DistAdam update (records/track_1_short/2025-07-12_BosAlign, `DistAdam.step`), written
    out plainly for one parameter: eps is added to sqrt(v) before the bias correction."""
    b1, b2 = betas
    state.setdefault("m", torch.zeros_like(p))
    state.setdefault("v", torch.zeros_like(p))
    state["t"] = state.get("t", 0) + 1
    t = state["t"]
    p.mul_(1 - lr * weight_decay * wd_mul)
    state["m"].mul_(b1).add_(g, alpha=1 - b1)
    state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
    step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    p.sub_(state["m"] / (state["v"].sqrt() + eps) * step_size)


def test_distadam_matches_the_records_adam():
    torch.manual_seed(5)
    shapes = [(40, 8), (13,), (3, 5, 7), ()]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    start = [p.detach().clone() for p in ours]
    ref = [p.detach().clone() for p in ours]
    states = [{} for _ in ours]
    ours[1].lr_mul = 3.0  # per-param multiplier == 3x the LR
    lr, betas, eps = 0.01, (0.8, 0.95), 1e-10
    opt = DistAdam(ours, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    for _ in range(6):
        for i, (a, b) in enumerate(zip(ours, ref)):
            g = torch.randn(a.shape)
            a.grad = g.clone()
            record_adam_step(b, g, states[i], lr * (3.0 if i == 1 else 1.0), betas, eps)
        opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
    # and they really moved (the comparison is not between two untouched tensors)
    assert all((a.detach() - s).abs().max() > 1e-3 for a, s in zip(ours, start))


def test_distadam_eps_is_added_before_the_bias_correction():
    # A gradient of the size of eps tells the two eps rules apart: the record's (eps on sqrt(v), before the
    # bias correction) moves the parameter by lr * sqrt(1-b2) / (1-b1) * m / (sqrt(v) + eps), that is with an
    # effective eps larger by 1/sqrt(1-b2), so less than torch.optim.Adam (0.18 against 0.5 here).
    lr, betas, eps = 1.0, (0.8, 0.95), 1e-3
    g = torch.full((4,), 1e-3)
    p = nn.Parameter(torch.zeros(4))
    p.grad = g.clone()
    DistAdam([p], lr=lr, betas=betas, eps=eps).step()
    ref, state = torch.zeros(4), {}
    record_adam_step(ref, g, state, lr, betas, eps)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-6, atol=0)
    q = nn.Parameter(torch.zeros(4))
    q.grad = g.clone()
    torch.optim.Adam([q], lr=lr, betas=betas, eps=eps, foreach=False).step()
    # record: m = 0.2g, sqrt(v) = sqrt(0.05) g, g = eps: step = 0.2 / (sqrt(0.05) + 1) * sqrt(0.05) / 0.2 = 0.183;
    # torch: m_hat = g, sqrt(v_hat) = g: step = g / (g + eps) = 0.5
    assert p.detach()[0].item() == pytest.approx(-0.2 / (math.sqrt(0.05) + 1) * math.sqrt(0.05) / 0.2, rel=1e-5)
    assert q.detach()[0].item() == pytest.approx(-0.5, rel=1e-5)


def test_distadam_weight_decay_is_decoupled():
    torch.manual_seed(6)
    p = nn.Parameter(torch.randn(10))
    q = p.detach().clone()
    p.wd_mul = 2.0
    g = torch.randn(10)
    p.grad = g.clone()
    DistAdam([p], lr=0.1, weight_decay=0.5).step()
    record_adam_step(q, g, {}, lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.5, wd_mul=2.0)
    torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)


# -----------------------------------------------------------------------------
# build_optimizers

class TinyGPTLike(nn.Module):
    """Parameter names and shapes in the spirit of the speedrun GPT, small."""

    def __init__(self, d=16, vocab=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.value_embeds = nn.ModuleList([nn.Embedding(vocab, d) for _ in range(2)])
        self.qkv_w = nn.Parameter(torch.randn(3, d, d))
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_proj = nn.Linear(4 * d, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.scalars = nn.Parameter(torch.ones(10))


KINDS = {"embed.weight": "embed", "value_embeds.0.weight": "value_embed", "value_embeds.1.weight": "value_embed",
         "qkv_w": "hidden", "c_fc.weight": "hidden", "c_proj.weight": "hidden", "lm_head.weight": "lm_head",
         "scalars": "scalar"}


def test_build_optimizers_covers_every_param_once():
    model = TinyGPTLike()
    adam, muon = build_optimizers(model, KINDS)
    seen = [p for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_ids == {id(model.qkv_w), id(model.c_fc.weight), id(model.c_proj.weight)}
    assert {g["kind"] for g in adam.param_groups} == {"embed", "value_embed", "lm_head", "scalar"}
    for opt, lr in ((adam, 0.008), (muon, 0.05)):
        assert all(g["initial_lr"] == g["lr"] == lr for g in opt.param_groups)
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["eps"] == 1e-10
    assert muon.defaults["momentum"] == 0.95


@pytest.mark.parametrize("change, needle", [
    (lambda k: k.pop("c_fc.weight"), "c_fc.weight"),                          # forgotten parameter
    (lambda k: k.update({"c_fc.weight": "mlp"}), "'mlp'"),                     # unknown kind
    (lambda k: k.update({"gone.weight": "hidden"}), "gone.weight"),            # name not in the model
    (lambda k: k.update({"scalars": "hidden"}), "scalars"),                    # vector sent to Muon
])
def test_build_optimizers_rejects_bad_kinds(change, needle):
    kinds = dict(KINDS)
    change(kinds)
    with pytest.raises(ValueError, match="exactly one optimizer group") as info:
        build_optimizers(TinyGPTLike(), kinds)
    assert needle in str(info.value)


def test_build_optimizers_rejects_tied_param_with_two_kinds():
    model = TinyGPTLike()
    model.lm_head.weight = model.embed.weight  # tied: one tensor, two names
    with pytest.raises(ValueError, match="two different kinds"):
        build_optimizers(model, KINDS)
    kinds = dict(KINDS, **{"lm_head.weight": "embed"})
    adam, _ = build_optimizers(model, kinds)  # same kind under both names: fine, held once
    assert sum(p is model.embed.weight for g in adam.param_groups for p in g["params"]) == 1


def test_lr_mul_multiplies_into_existing_and_rebuild_is_idempotent():
    model = TinyGPTLike()
    model.embed.weight.lr_mul = 0.5        # e.g. a muP factor set before building
    model.c_fc.weight.lr_mul = 2.0
    build_optimizers(model, KINDS)
    assert model.embed.weight.lr_mul == 0.5 * 75.0
    assert model.value_embeds[0].weight.lr_mul == 75.0
    assert model.lm_head.weight.lr_mul == 27.5
    assert model.scalars.lr_mul == 5.0
    assert model.c_fc.weight.lr_mul == 2.0  # hidden kind multiplier is 1
    build_optimizers(model, KINDS, lr_muls={"embed": 10.0})
    assert model.embed.weight.lr_mul == 0.5 * 10.0  # old kind factor divided out, new one applied
    with pytest.raises(ValueError, match="unknown kinds"):
        build_optimizers(model, KINDS, lr_muls={"head": 1.0})


def test_lr_mul_reaches_the_update():
    # The kind multiplier must change the real step: lm_head (27.5x) vs an identical param with 1x.
    model = TinyGPTLike()
    adam, _ = build_optimizers(model, KINDS)
    w = model.lm_head.weight
    before = w.detach().clone()
    w.grad = torch.ones_like(w)
    adam.step()
    # first Adam step moves every coordinate by lr * lr_mul (m/sqrt(v) = 1 after bias correction)
    torch.testing.assert_close((before - w.detach()), torch.full_like(w, 0.008 * 27.5), rtol=1e-5, atol=1e-7)


def test_set_muon_momentum_warmup():
    muon = Muon([nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(8, 4))])
    assert set_muon_momentum(muon, 0) == pytest.approx(0.85)
    assert set_muon_momentum(muon, 150) == pytest.approx(0.90)
    assert set_muon_momentum(muon, 300) == pytest.approx(0.95)
    assert set_muon_momentum(muon, 10_000) == pytest.approx(0.95)
    set_muon_momentum(muon, 75)
    assert all(g["momentum"] == pytest.approx(0.875) for g in muon.param_groups)


def test_state_dict_round_trip_restores_the_trajectory():
    # The trainer snapshots and restores optimizer state around its kernel warm-up steps.
    model = TinyGPTLike()
    adam, muon = build_optimizers(model, KINDS)

    def run(steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            adam.step()
            muon.step()

    run(2, 0)
    snapshot = ([p.detach().clone() for p in model.parameters()],
                copy.deepcopy(adam.state_dict()), copy.deepcopy(muon.state_dict()))
    run(2, 1)
    after = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, s in zip(model.parameters(), snapshot[0]):
            p.copy_(s)
    adam.load_state_dict(snapshot[1])
    muon.load_state_dict(snapshot[2])
    run(2, 1)
    for p, a in zip(model.parameters(), after):
        torch.testing.assert_close(p.detach(), a, rtol=0, atol=0)


def test_one_adam_group_alone_gets_its_multiplier_and_the_record_is_bitwise_at_one():
    """--embed/--head/--scalar-lr-mult scale one Adam group's LR (the per-group sweeps); at 1 nothing changes."""
    from core.config import TrainConfig
    from core.steps import build_model, build_optimizer_pair
    cfg = TrainConfig(width=32, depth=2, head_dim=16, vocab_size=257, bos_id=256, seq_len=128, val_seq_len=128,
                      iterations=2)
    lrs = {}
    for mults in ({}, {"head_lr_mult": 2.0}, {"embed_lr_mult": 0.5, "scalar_lr_mult": 4.0}):
        c = TrainConfig(**{**cfg.__dict__, **mults})
        adam, _, _ = build_optimizer_pair(build_model(c, torch.device("cpu"), "off"), c)
        lrs[tuple(mults)] = {g["kind"]: g["lr"] * g["params"][0].lr_mul for g in adam.param_groups}
    base, head, rest = lrs[()], lrs[("head_lr_mult",)], lrs[("embed_lr_mult", "scalar_lr_mult")]
    assert base["embed"] == 0.008 * 75 and base["lm_head"] == 0.008 * 27.5 and base["scalar"] == 0.008 * 5
    assert head["lm_head"] == 2 * base["lm_head"] and head["embed"] == base["embed"]
    assert rest["embed"] == rest["value_embed"] == 0.5 * base["embed"] and rest["scalar"] == 4 * base["scalar"]
    assert rest["lm_head"] == base["lm_head"]
