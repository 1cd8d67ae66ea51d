"""TrainingMonitor (core/monitor.py): host syncs per step, hook lifetime, metric values by hand."""
import math

import pytest
import torch
from torch import nn

from core.monitor import TrainingMonitor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only spin-waits on a loaded 2-core machine
    yield
    torch.set_num_threads(n)


class Tiny(nn.Module):
    """Embedding, two blocks, a (3, h, d) qkv stack and a head: the shapes the monitor meets in the GPT."""

    def __init__(self, d=16, vocab=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(2)])
        self.qkv_w = nn.Parameter(torch.randn(3, d, d) / d**0.5)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + torch.relu(b(h))
        q, k, v = (h @ w.T for w in self.qkv_w)
        h = h + torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return self.head(h)


def hidden_of(model):
    return {"blocks.0.weight": model.blocks[0].weight, "blocks.1.weight": model.blocks[1].weight,
            "qkv_w": model.qkv_w}


class HostSyncCounter:
    """Counts Python-level calls that read a tensor back to the host (each one syncs on CUDA)."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _orig=original, **k):
                self.n += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


def test_at_most_one_host_sync_per_log_step_and_none_otherwise(monkeypatch):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = TrainingMonitor(model, hidden_of(model), log_every=5, spectral_every=10, activations=True)
    batches = [torch.randint(0, 32, (4, 8)) for _ in range(20)]
    counter = HostSyncCounter(monkeypatch)
    per_step, logged = [], []
    for step, x in enumerate(batches):
        before = counter.n
        with mon.activation_hooks(step):
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
            loss.backward()
        mon.after_backward(step)
        mon.before_optimizer(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.after_optimizer(step)
        if mon.is_log_step(step):
            logged.append(mon.collect(step, extra={"Loss/train_loss": loss}))
        per_step.append(counter.n - before)
    log_steps = [s for s in range(20) if mon.is_log_step(s)]
    assert log_steps == [0, 5, 10, 15]
    for step, n in enumerate(per_step):
        assert n == (1 if step in log_steps else 0), f"step {step}: {n} host syncs (per step: {per_step})"
    assert "Model/spectral_norm_max" in logged[2] and "Activations/block_0_mean" in logged[2]
    assert "Model/spectral_norm_max" not in logged[1] and set(logged[1]) == {
        "Optimization/grad_norm", "Model/param_norm", "Loss/train_loss"}


def _count_hooks(modules):
    return sum(len(m._forward_hooks) for m in modules)


def test_hooks_only_on_measuring_steps_and_always_removed():
    model = Tiny()
    mods = list(model.blocks)
    off = TrainingMonitor(model, hidden_of(model), log_every=1, spectral_every=1, activations=False)
    for step in range(3):
        with off.activation_hooks(step):
            assert _count_hooks(mods) == 0
            model(torch.zeros(1, 4, dtype=torch.long))
    on = TrainingMonitor(model, hidden_of(model), log_every=1, spectral_every=0, activations=True,
                         activation_every=2)
    for step in range(4):
        with on.activation_hooks(step):
            assert _count_hooks(mods) == (2 if step % 2 == 0 else 0)
            model(torch.zeros(1, 4, dtype=torch.long))
        assert _count_hooks(mods) == 0
    with pytest.raises(RuntimeError):
        with on.activation_hooks(0):
            raise RuntimeError("a failing forward")
    assert _count_hooks(mods) == 0


class Fixed(nn.Module):
    def forward(self, x):
        return torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_activation_statistics_by_hand():
    model = nn.Sequential(Fixed())
    mon = TrainingMonitor(model, {}, log_every=1, activations=True, activation_modules={"fixed": model[0]})
    with mon.activation_hooks(0):
        model(torch.zeros(1))
    out = mon.collect(0)
    # [1, 2, 3, 4]: mean 2.5, population std sqrt(1.25), max 4, min 1, l2 sqrt(30)
    assert out["Activations/fixed_mean"] == pytest.approx(2.5)
    assert out["Activations/fixed_std"] == pytest.approx(math.sqrt(1.25))
    assert out["Activations/fixed_max"] == 4.0 and out["Activations/fixed_min"] == 1.0
    assert out["Activations/fixed_l2_norm"] == pytest.approx(math.sqrt(30))


def test_update_ratio_and_norms_by_hand():
    model = nn.Module()
    model.a = nn.Parameter(2.0 * torch.eye(4))  # ||A||_F = 4
    model.z = nn.Parameter(torch.zeros(3, 3))   # zero init, like the output projections
    mon = TrainingMonitor(model, {"a": model.a, "z": model.z}, log_every=1, spectral_every=1)
    (model.a.sum() + 2 * model.z.sum()).backward()  # grads: ones(4,4) (norm 4), 2*ones(3,3) (norm 6)
    mon.after_backward(0)
    mon.before_optimizer(0)
    with torch.no_grad():
        model.a[0, 0] -= 0.5    # ||dA|| = 0.5 -> ratio 0.5 / 4
        model.z[1, 2] += 0.25   # W_before = 0: relative to W_after, ratio 1
    mon.after_optimizer(0)
    out = mon.collect(0)
    assert out["Optimization/grad_norm"] == pytest.approx(math.sqrt(16 + 36))
    assert out["Model/update_ratio/a"] == pytest.approx(0.125)
    assert out["Model/update_ratio/z"] == pytest.approx(1.0)
    assert out["Model/update_ratio_mean"] == pytest.approx((0.125 + 1.0) / 2)
    # after the update: A = diag(1.5, 2, 2, 2) -> ||A||_2 = 2; Z has one entry 0.25 -> ||Z||_2 = 0.25
    assert out["Model/spectral_norm/a"] == pytest.approx(2.0, rel=1e-5)
    assert out["Model/spectral_norm/z"] == pytest.approx(0.25, rel=1e-5)
    assert out["Model/spectral_norm_max"] == pytest.approx(2.0, rel=1e-5)
    assert out["Model/spectral_norm_mean"] == pytest.approx(1.125, rel=1e-5)
    assert out["Model/spectral_norm_std"] == pytest.approx(0.875, rel=1e-5)
    assert out["Model/param_norm"] == pytest.approx(math.sqrt(1.5**2 + 3 * 4 + 0.25**2), rel=1e-6)


def test_spectral_norms_per_slice_match_exact_values():
    torch.manual_seed(1)
    model = Tiny(d=24)
    mon = TrainingMonitor(model, hidden_of(model), log_every=1, spectral_every=1)
    mon.after_optimizer(0)
    out = mon.collect(0)
    for i, s in enumerate("qkv"):
        exact = torch.linalg.matrix_norm(model.qkv_w[i].detach().double(), ord=2).item()
        assert out[f"Model/spectral_norm/qkv_w.{s}"] == pytest.approx(exact, rel=0.01)
    exact = torch.linalg.matrix_norm(model.blocks[1].weight.detach().double(), ord=2).item()
    assert out["Model/spectral_norm/blocks.1.weight"] == pytest.approx(exact, rel=0.01)
    assert out["Model/spectral_residual_max"] < 0.02


def test_schedule_and_state_dict():
    model = Tiny()
    mon = TrainingMonitor(model, hidden_of(model), log_every=4, spectral_every=6, activations=True,
                          activation_every=9, total_steps=13)
    assert [s for s in range(14) if mon.is_log_step(s)] == [0, 4, 6, 8, 9, 12, 13]
    assert [s for s in range(14) if mon.measures_spectral(s)] == [0, 6, 12]
    mon.after_optimizer(0)
    mon.collect(0)
    other = TrainingMonitor(model, hidden_of(model), log_every=4)
    other.load_state_dict(mon.state_dict())
    a = mon.tracker.estimate({"w": model.blocks[0].weight.detach()})
    b = other.tracker.estimate({"w": model.blocks[0].weight.detach()})
    assert torch.equal(a.norms, b.norms)
    with pytest.raises(ValueError, match="log_every"):
        TrainingMonitor(model, {}, log_every=0)


def test_collect_without_pending_values_reads_nothing(monkeypatch):
    model = Tiny()
    mon = TrainingMonitor(model, hidden_of(model), log_every=5)
    counter = HostSyncCounter(monkeypatch)
    assert mon.collect(3, extra={"Optimization/lr": 0.1}) == {"Optimization/lr": 0.1}
    assert counter.n == 0


def test_module_for_keeps_activation_stats_with_a_compiled_model():
    # A compiled graph ignores hooks added after compilation; module_for runs activation steps eagerly.
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend=backend)
    mon = TrainingMonitor(model, {}, log_every=1, activations=True, activation_every=2,
                          activation_modules={"fc0": model[0]})
    for step in range(6):
        with mon.activation_hooks(step):
            mon.module_for(step, compiled)(torch.randn(4, 8)).sum().backward()
        got = mon.collect(step)
        assert ("Activations/fc0_mean" in got) == (step % 2 == 0), f"step {step}: {sorted(got)}"
    assert len(compiles) == 1, "the compiled graph must not be recompiled for the hooks"
    torch._dynamo.reset()


def test_extra_tensors_share_the_transfer_and_override_monitor_keys(monkeypatch):
    model = Tiny()
    mon = TrainingMonitor(model, hidden_of(model), log_every=1, spectral_every=0)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    mon.after_backward(1)
    mon.after_optimizer(1)
    counter = HostSyncCounter(monkeypatch)
    out = mon.collect(1, extra={"Optimization/grad_norm": torch.tensor(7.0), "Loss/train_loss": torch.tensor([2.5])})
    assert counter.n == 1
    assert out["Optimization/grad_norm"] == 7.0 and out["Loss/train_loss"] == 2.5 and "Model/param_norm" in out


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_activation_stats_match_float64_on_a_logits_sized_tensor(shift):
    """A plain fp32 vector_norm over millions of CPU elements is off by ~1e-3; the stats must not be."""
    from core.monitor import activation_stats
    torch.manual_seed(0)
    x = torch.randn(1, 512, 20000) + shift
    got = activation_stats(x).double()
    xd = x.double()
    want = torch.stack([xd.mean(), xd.std(correction=0), xd.max(), xd.min(), xd.norm()])
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
