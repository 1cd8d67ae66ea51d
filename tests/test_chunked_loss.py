"""The chunked readout + soft-cap + cross-entropy (core/chunked_loss.py) equals the record's unchunked one.

Loss and every gradient (lm_head, its input, the whole model), sum and mean, SP and muP (output multiplier and
soft-cap divisor), FP8 (the custom op and its emulation), chunk boundaries that split documents and rows that
do not divide the sequence, a padded vocabulary (300 -> 384) with targets up to its last real id; the
observers that the coordinate check and the activation monitor read; the float64 golden curves; and where the
trainer uses it (`--chunked-loss`).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from core import chunked_loss
from core.chunked_loss import chunked_softcap_cross_entropy, default_chunk_rows, resolve_loss_paths
from core.model import GPT, GPTConfig

VOCAB, BOS = 300, 299  # padded to 384: the 84 pad columns take part in the softmax, as in the record


def _readout(width=64, mup=False, fp8="off", seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=VOCAB, depth=2, width=width, head_dim=32, max_seq_len=1024, bos_id=BOS, fp8=fp8,
                    mup=mup, base_width=32 if mup else None)
    model = GPT(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5 / math.sqrt(width))  # zero-initialised in the model: give it values
    return model


def _unchunked(model, x, targets, reduction):
    z = model.lm_head(x)
    logits = model.cfg.softcap * torch.sigmoid(z / model.softcap_divisor)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets, reduction=reduction)


def _loss_and_grads(fn, model, x, targets):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    loss = fn(x, targets)
    loss.backward()
    return loss.detach(), x.grad, model.lm_head.weight.grad.clone()


def _targets(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, VOCAB, (n,), generator=g)
    t[::7] = VOCAB - 1  # the last real id, next to the padded columns
    return t


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mup", [False, True])
@pytest.mark.parametrize("rows", [96, 128, 1000])  # 96 and 128 split the 500 rows unevenly; 1000: one chunk
def test_chunked_equals_unchunked_loss_and_gradients(reduction, mup, rows):
    model = _readout(mup=mup)
    T, C = 500, model.cfg.width
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(2))
    targets = _targets(T)
    ref = _loss_and_grads(lambda x, t: _unchunked(model, x, t, reduction), model, x, targets)
    got = _loss_and_grads(lambda x, t: chunked_softcap_cross_entropy(
        x, model.lm_head, t, model.cfg.softcap, model.softcap_divisor, reduction, rows=rows), model, x, targets)
    for name, a, b in zip(("loss", "grad x", "grad lm_head"), ref, got):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} differs")
    if mup:
        assert model.lm_head.output_mult != 1.0 and model.softcap_divisor != 7.5 * math.sqrt(model.cfg.width)


@pytest.mark.parametrize("fp8", ["fp8", "emulated"])
def test_chunked_keeps_the_fp8_lm_head(fp8):
    """The FP8 path (the nanogpt::mm custom op on CPU, or its emulation) per chunk: same loss and gradients."""
    model = _readout(width=64, mup=True, fp8=fp8)
    model.train()
    T = 384
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(3))
    targets = _targets(T)
    ref = _loss_and_grads(lambda x, t: _unchunked(model, x, t, "sum"), model, x, targets)
    got = _loss_and_grads(lambda x, t: chunked_softcap_cross_entropy(
        x, model.lm_head, t, model.cfg.softcap, model.softcap_divisor, "sum", rows=128), model, x, targets)
    unq = model.lm_head.fp8
    model.lm_head.fp8 = "off"  # the FP8 path is really taken: a plain matmul gives other numbers
    plain = _loss_and_grads(lambda x, t: _unchunked(model, x, t, "sum"), model, x, targets)
    model.lm_head.fp8 = unq
    assert not torch.allclose(plain[2], ref[2], rtol=1e-6, atol=0)
    for name, a, b in zip(("loss", "grad x", "grad lm_head"), ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"{name} differs ({fp8})")


def _doc_batch(T=512, seed=4):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB - 1, (T + 1,), generator=g)
    tokens[torch.tensor([0, 37, 130, 200, 333, 420])] = BOS  # documents that chunk boundaries (128, 256, ...) split
    return tokens[:-1].contiguous(), tokens[1:].contiguous()


@pytest.mark.parametrize("mup", [False, True])
def test_model_gradients_equal_with_chunks_that_split_documents(mup, monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 128 * 384 * 4)  # 128-row chunks at the 384 padded vocabulary
    assert default_chunk_rows(384) == 128
    model = _readout(mup=mup)
    with torch.no_grad():  # nonzero output projections, so that every parameter gets a gradient
        for block in model.blocks:
            block.mlp.c_proj.weight.normal_(0, 0.02)
            if block.attn is not None:
                block.attn.c_proj.weight.normal_(0, 0.02)
    inputs, targets = _doc_batch()

    def run(chunked):
        model.zero_grad(set_to_none=True)
        loss = model(inputs, targets, 2, chunked=chunked)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (l0, g0), (l1, g1) = run(False), run(True)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys() and "lm_head.weight" in g0 and "embed.weight" in g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")


def test_validation_forward_without_autograd_equals_unchunked(monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 128 * 384 * 4)
    model = _readout(mup=True).eval()
    inputs, targets = _doc_batch()
    with torch.no_grad():
        a = model(inputs, targets, 2, reduction="mean")
        b = model(inputs, targets, 2, reduction="mean", chunked=True)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


def test_observers_see_every_chunk_once_in_order(monkeypatch):
    """The readout reports z to its observers in the forward only (not in the backward's recompute)."""
    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 128 * 384 * 4)
    model = _readout()
    inputs, targets = _doc_batch()
    seen = []
    handle = model.lm_head.observe(lambda z, first, last: seen.append((z.shape[0], first, last, z.requires_grad)))
    model(inputs, targets, 2, chunked=True).backward()
    assert seen == [(128, True, False, False), (128, False, False, False), (128, False, False, False),
                    (128, False, True, False)]
    seen.clear()
    model(inputs, targets, 2).backward()  # unchunked: z whole, once
    assert seen == [(1, True, True, False)]  # (1, T, V)
    handle.remove()
    model(inputs, targets, 2, chunked=True)
    assert len(seen) == 1


def test_coord_check_and_activation_stats_equal_on_both_paths(monkeypatch):
    from core.coord_check import CoordRecorder
    from core.monitor import TrainingMonitor
    from core.steps import activation_modules

    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 128 * 384 * 4)
    model = _readout(mup=True)
    inputs, targets = _doc_batch()
    rows, acts = [], []
    for chunked in (False, True):
        rec = CoordRecorder(model)
        mon = TrainingMonitor(model, {}, log_every=1, spectral_every=0, activations=True,
                              activation_modules=activation_modules(model), activation_every=1)
        with rec.recording(), mon.activation_hooks(1):
            model(inputs, targets, 2, chunked=chunked).backward()
        rows.append(rec.finish_step(0))
        acts.append(mon.collect(1))
    assert rows[0].keys() == rows[1].keys() and "CoordCheck/readout" in rows[0] and "CoordCheck/logits" in rows[0]
    for k in rows[0]:
        assert rows[1][k] == pytest.approx(rows[0][k], rel=1e-6), k
    assert "Activations/lm_head_max" in acts[0] and acts[0].keys() == acts[1].keys()
    for k in acts[0]:
        assert acts[1][k] == pytest.approx(acts[0][k], rel=1e-5, abs=1e-7), k


def test_golden_curves_are_unchanged_by_the_chunked_loss_in_float64(monkeypatch):
    """The float64 golden runs (tests/test_golden.py) with every step chunked: equal to the reference within its
    tolerance, so the chunked path changes only float rounding."""
    import json

    import core.trainer
    from core.steps import forward_backward
    from tests.test_golden import CURVES, GOLDEN, TOLERANCE, golden_losses

    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 128 * 50304 * 4)  # 128-row chunks of the 256-token sequences
    monkeypatch.setattr(core.trainer, "forward_backward",
                        lambda model, batches, window, accum: forward_backward(model, batches, window, accum, chunked=True))
    reference = json.loads(GOLDEN.read_text())
    for name, mup in CURVES:
        losses = golden_losses(mup, steps=4)
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference[name][:4]))
        assert worst < TOLERANCE, f"{name}: chunked float64 curve {worst:.2e} from the reference"


def test_resolve_loss_paths():
    auto_cuda = resolve_loss_paths("auto", True, "cuda")
    assert (auto_cuda.train, auto_cuda.eager, auto_cuda.val) == (False, True, True)
    assert "record" in auto_cuda.reason and "not measured on a GPU" in auto_cuda.reason
    auto_cpu = resolve_loss_paths("auto", False, "cpu")
    assert (auto_cpu.train, auto_cpu.eager, auto_cpu.val) == (False, True, True)
    assert resolve_loss_paths("on", True, "cuda")[:3] == (True, True, True)
    assert resolve_loss_paths("off", False, "cpu")[:3] == (False, False, False)
    with pytest.raises(ValueError, match="--chunked-loss"):
        resolve_loss_paths("sometimes", False, "cpu")


def test_chunked_loss_flag_and_default_rows():
    from core.config import parse_args
    assert parse_args([]).chunked_loss == "auto"
    assert parse_args(["--chunked-loss", "off"]).chunked_loss == "off"
    with pytest.raises(SystemExit):
        parse_args(["--chunked-loss", "maybe"])
    assert default_chunk_rows(50304) == 1280  # 1280 x 50304 fp32 = 246 MiB <= CHUNK_BYTES
    assert default_chunk_rows(10**9) == 128   # never fewer than 128 rows
    with pytest.raises(ValueError, match="reduction"):
        chunked_softcap_cross_entropy(torch.zeros(4, 64), _readout().lm_head, torch.zeros(4, dtype=torch.long),
                                      30.0, 1.0, reduction="none")


# ---------------------------------------------------------------------------------------------
# GPU only (skipped without CUDA): bf16 activations, the FP8 custom op, FlexAttention, torch.compile


def _cuda_model(width, seq_len, fp8):
    from core.config import TrainConfig, resolve_defaults
    from core.steps import build_model
    cfg = resolve_defaults(TrainConfig(width=width, depth=2, head_dim=128, seq_len=seq_len, batch_tokens=seq_len,
                                       val_seq_len=seq_len), "cuda", env={})
    cfg.vocab_size, cfg.bos_id = 50257, 50256
    model = build_model(cfg, torch.device("cuda"), fp8)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5 / width ** 0.5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50256, (seq_len + 1,), generator=g)
    tokens[::997] = 50256
    return model, tokens[:-1].cuda(), tokens[1:].cuda()


def _fp8_mode():
    return "fp8" if torch.cuda.get_device_capability() >= (8, 9) else "off"


@pytest.mark.gpu
def test_cuda_chunked_equals_unchunked_and_saves_two_logit_tensors():
    """Eager, as the coordinate-check steps run: the same loss and gradients (bf16 tolerances), and the peak
    allocated memory of the step lower by at least two full fp32 logit tensors (T x 50,304 x 4 bytes)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    T = 8192
    model, inputs, targets = _cuda_model(768, T, _fp8_mode())
    window = torch.tensor(T // 128, dtype=torch.int32, device="cuda")
    results = {}
    for chunked in (False, True, False, True):  # twice: the first of each compiles FlexAttention / the FP8 kernels
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = model(inputs, targets, window, chunked=chunked)
        loss.backward()
        torch.cuda.synchronize()
        results[chunked] = (loss.item(), model.lm_head.weight.grad.clone(), model.embed.weight.grad.float().clone(),
                            torch.cuda.max_memory_allocated() - base)
    (l0, w0, e0, m0), (l1, w1, e1, m1) = results[False], results[True]
    assert l1 == pytest.approx(l0, rel=1e-4)
    torch.testing.assert_close(w1, w0, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(e1, e0, rtol=2e-2, atol=1e-3)
    logit_bytes = T * 50304 * 4
    assert m0 - m1 >= 2 * logit_bytes, f"saved {(m0 - m1) / logit_bytes:.2f} logit tensors (peaks {m0 / 2**30:.1f} " \
                                       f"and {m1 / 2**30:.1f} GiB)"


@pytest.mark.gpu
def test_cuda_compiled_model_with_the_chunked_loss_trains_and_validates():
    """--chunked-loss on with torch.compile: the chunked loss is a graph break; loss and lm_head gradient as eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    T = 2048
    model, inputs, targets = _cuda_model(256, T, _fp8_mode())
    window = torch.tensor(T // 128, dtype=torch.int32, device="cuda")
    compiled = torch.compile(model, dynamic=False)
    out = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = m(inputs, targets, window, chunked=True)
        loss.backward()
        out.append((loss.item(), model.lm_head.weight.grad.clone()))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-3)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=5e-2, atol=1e-3)
    model.eval()
    with torch.no_grad():
        a = compiled(inputs, targets, window, reduction="mean", chunked=True).item()
        b = compiled(inputs, targets, window, reduction="mean").item()
    assert a == pytest.approx(b, rel=1e-3)
