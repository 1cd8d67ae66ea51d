"""Spectral norms (core/spectral.py) against exact float64 SVD values on fixed seeded matrices."""
import math

import pytest
import torch
from torch import nn

from core.spectral import (SpectralNormTracker, compute_weight_spectral_norms, matrix_slices, spectral_norms)


def exact(W: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(W.double(), ord=2).item()


def gaussian(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) / math.sqrt(n)


def spiked(m, n, seed, strength=3.0):
    g = torch.Generator().manual_seed(seed + 1000)
    u, v = torch.randn(m, 1, generator=g), torch.randn(n, 1, generator=g)
    return gaussian(m, n, seed) + strength * (u / u.norm()) @ (v / v.norm()).T


def low_rank(m, n, seed, rank=3):
    g = torch.Generator().manual_seed(seed + 2000)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / n


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: a second OpenMP thread only adds spin-waiting, badly so on a loaded 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def family():
    return {
        "gauss_sq": gaussian(128, 128, 0),
        "gauss_tall": gaussian(256, 64, 1),
        "gauss_wide": gaussian(64, 256, 2),
        "spiked": spiked(128, 128, 3),
        "low_rank": low_rank(96, 128, 4),
    }


def rel_errors(est, mats):
    return {n: est.norms[i].item() / exact(mats[n]) - 1 for i, n in enumerate(est.names)}


def test_power_cold_within_1pct_and_never_above(family):
    est = spectral_norms(family, "power")
    errs = rel_errors(est, family)
    assert set(errs) == set(family)
    for name, e in errs.items():
        assert abs(e) < 0.01, f"{name}: relative error {e:+.3%}"
        assert e < 1e-5, f"{name}: a Rayleigh quotient cannot exceed the norm, got {e:+.2e}"


def test_zero_matrix_is_zero_and_picked_up_when_it_moves():
    tracker = SpectralNormTracker(cold_iters=10, warm_iters=4)
    W = torch.zeros(64, 64)
    est = tracker.estimate({"w": W})
    assert est.norms[0].item() == 0.0 and est.residuals[0].item() == 0.0
    W2 = gaussian(64, 64, 7)
    est = tracker.estimate({"w": W2})  # warm call after a zero start: the stored block must still be usable
    assert abs(est.norms[0].item() / exact(W2) - 1) < 0.02


def test_tracker_warm_start_improves_and_tracks_small_changes(family):
    W = family["gauss_sq"]
    tracker = SpectralNormTracker(cold_iters=5, warm_iters=3)
    residuals = [tracker.estimate({"w": W}).residuals[0].item() for _ in range(5)]
    assert residuals[-1] < residuals[0] / 3, f"warm calls should keep converging: {residuals}"
    g = torch.Generator().manual_seed(11)
    for _ in range(3):  # weights that move slowly, as in training
        W = W + 0.01 * torch.randn(W.shape, generator=g) / math.sqrt(W.shape[1])
        est = tracker.estimate({"w": W})
        assert abs(est.norms[0].item() / exact(W) - 1) < 0.01
    assert tracker.converged(est).all()


def test_state_dict_roundtrip_reproduces_estimates(family):
    a = SpectralNormTracker(cold_iters=5, warm_iters=2)
    a.estimate(family)
    b = SpectralNormTracker(cold_iters=5, warm_iters=2)
    b.load_state_dict(a.state_dict())
    ea, eb = a.estimate(family), b.estimate(family)
    assert ea.names == eb.names
    assert torch.equal(ea.norms, eb.norms)
    fresh = SpectralNormTracker(cold_iters=5, warm_iters=2).estimate(family)
    assert not torch.equal(fresh.norms, ea.norms), "a cold tracker should differ from a warm one"


def test_3d_parameters_are_split_and_named():
    qkv = torch.stack([gaussian(32, 48, s) for s in range(3)])
    other = torch.stack([gaussian(16, 16, s) for s in range(10, 12)])
    assert [n for n, _ in matrix_slices("blocks.0.attn.qkv_w", qkv)] == [
        "blocks.0.attn.qkv_w.q", "blocks.0.attn.qkv_w.k", "blocks.0.attn.qkv_w.v"]
    assert [n for n, _ in matrix_slices("w", other)] == ["w[0]", "w[1]"]
    with pytest.raises(ValueError, match="only 2D matrices"):
        matrix_slices("bias", torch.zeros(4))
    out = compute_weight_spectral_norms(None, {"attn.qkv_w": qkv, "w": other})
    for i, s in enumerate("qkv"):
        assert abs(out[f"attn.qkv_w.{s}"].item() / exact(qkv[i]) - 1) < 0.01
    assert abs(out["w[1]"].item() / exact(other[1]) - 1) < 0.01


def test_names_resolved_on_the_model_and_errors_say_what_to_do():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False))
    out = compute_weight_spectral_norms(model, ["0.weight", "2.weight"])
    assert abs(out["2.weight"].item() / exact(model[2].weight.detach()) - 1) < 0.01
    # the user's docs pass the optimizer's parameter list itself
    by_param = compute_weight_spectral_norms(model, [model[0].weight, model[2].weight], mode="ns5-fast", power_iters=7)
    assert set(by_param) == {"0.weight", "2.weight"}
    with pytest.raises(KeyError, match="not a parameter of the model"):
        compute_weight_spectral_norms(model, [torch.zeros(3, 3)])
    with pytest.raises(KeyError, match="names look like"):
        compute_weight_spectral_norms(model, ["nope.weight"])
    with pytest.raises(ValueError, match="choose one of"):
        compute_weight_spectral_norms(model, ["0.weight"], mode="svd")


def test_exact_mode_matches_svd(family):
    est = spectral_norms(family, "exact")
    for i, n in enumerate(est.names):
        assert est.norms[i].item() == pytest.approx(exact(family[n]), rel=1e-6)


def test_ns5_fast_is_biased_without_fallback():
    # For a rank-one W = s u v^T the Frobenius-normalised start is exactly 1, and five steps of the
    # quintic Muon map x -> a x + b x^3 + c x^5 take 1 to ~0.696 (it oscillates, it does not converge):
    # Q^T W has eigenvalue 0.696 s, the bias the module docstring warns about.
    a, b, c = 3.4445, -4.7750, 2.0315
    x = 1.0
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(96, 1, generator=g), torch.randn(64, 1, generator=g)
    W = 2.0 * (u / u.norm()) @ (v / v.norm()).T  # exact norm 2
    est = spectral_norms({"rank1": W}, "ns5-fast", ns_fallback_residual=math.inf)
    assert est.norms[0].item() == pytest.approx(2.0 * x, rel=0.02)  # bf16 polar factor
    assert abs(est.norms[0].item() / 2.0 - 1) > 0.25
    assert not est.used_fallback[0].item()


def test_ns3_accurate_close_on_spiked(family):
    est = spectral_norms({"spiked": family["spiked"]}, "ns3-accurate", ns_fallback_residual=math.inf)
    assert abs(est.norms[0].item() / exact(family["spiked"]) - 1) < 0.03


def test_ns_fallback_on_nonconvergence_and_nonfinite(family):
    W = family["gauss_sq"]
    est = spectral_norms({"w": W}, "ns5-fast", power_iters=1, ns_fallback_residual=0.01)
    assert est.used_fallback[0].item(), "one power iteration on a Gaussian matrix cannot converge"
    assert abs(est.norms[0].item() / exact(W) - 1) < 0.01, "the fallback is the accurate power method"
    bad = W.clone()
    bad[0, 0] = float("nan")
    est = spectral_norms({"w": bad}, "ns3-accurate")
    assert est.used_fallback[0].item()
    assert math.isnan(est.norms[0].item()), "a non-finite matrix must not get a finite norm"


class _CountHostSync:
    """Counts Python-level calls that read a tensor back to the host (they sync on CUDA)."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _name=name, _orig=original, **k):
                self.calls.append(_name)
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


def test_tracker_never_reads_back_to_host(family, monkeypatch):
    tracker = SpectralNormTracker(cold_iters=3, warm_iters=2)
    counter = _CountHostSync(monkeypatch)
    tracker.estimate(family)
    tracker.estimate(family)
    assert counter.calls == []


def test_same_shape_matrices_share_one_batched_matmul(monkeypatch):
    calls = []
    matmul, chol = torch.Tensor.__matmul__, torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: (calls.append("matmul"), matmul(a, b))[1])
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: (calls.append("chol"), chol(*a, **k))[1])

    def launches(k):
        calls.clear()
        SpectralNormTracker(cold_iters=4).estimate({f"w{i}": gaussian(64, 32, i) for i in range(k)})
        return len(calls)

    assert launches(1) > 0
    assert launches(1) == launches(6), "work must not grow in calls with the number of same-shape matrices"
