"""muP: InfShape, the rule table, muP == SP at the base width, init statistics, and the coordinate check."""
import math

import pytest
import torch

from core import mup
from core.config import TrainConfig, resolve_defaults
from core import coord_check
from core.coord_check import LAYER_TYPES, measure, slopes, verdict
from core.model import GPT, GPTConfig
from core.trainer import build_model, build_optimizer_pair, forward_backward, set_schedules


def train_cfg(**kw):
    base = dict(width=64, depth=4, head_dim=16, seq_len=256, batch_tokens=256, val_seq_len=256,
                iterations=20, seed=0, spectral_every=0, activations=False)
    base.update(kw)
    return resolve_defaults(TrainConfig(**base), "cpu", env={})


def test_infshape_marks_exactly_the_width_dimensions():
    cfg = GPTConfig(depth=12, width=512, head_dim=64, max_seq_len=256, mup=True, base_width=128)
    shapes = mup.infer_infshapes(GPT, cfg, base_width=128)
    inf = {name: tuple(d.is_infinite for d in s.dims) for name, s in shapes.items()}
    assert inf["embed.weight"] == (False, True)              # (vocab, width)
    assert inf["value_embeds.0.weight"] == (False, True)
    assert inf["lm_head.weight"] == (False, True)
    assert inf["blocks.0.attn.qkv_w"] == (False, True, True)  # (3, heads*head_dim, width)
    assert inf["blocks.0.attn.c_proj.weight"] == (True, True)
    assert inf["blocks.0.mlp.c_fc.weight"] == (True, True)
    assert inf["skip_weights"] == (False,)
    assert inf["block_lambdas"] == (False, False)
    assert shapes["blocks.0.mlp.c_fc.weight"].dims[0].base_dim == 4 * 128
    assert shapes["blocks.0.mlp.c_fc.weight"].width_mult == 4.0
    assert len(shapes) == len(list(GPT(GPTConfig(depth=12, width=128, head_dim=64, max_seq_len=8)).parameters()))


def test_lr_multipliers_follow_the_table():
    cfg = GPTConfig(depth=4, width=256, head_dim=32, max_seq_len=64, mup=True, base_width=64)
    shapes = mup.infer_infshapes(GPT, cfg, base_width=64)
    kinds = GPT(cfg).param_kinds()
    for name, kind in kinds.items():
        assert mup.lr_multiplier(kind, shapes[name]) == 1.0  # Muon hidden and vector-like Adam: constant
    # an Adam-trained hidden matrix would get 1/m (TP5 Table 3)
    adam_hidden = mup.InfShape((mup.InfDim(64, 256), mup.InfDim(64, 256)))
    mup.MUP_RULES["_adam_hidden_probe"] = mup.MupRule("adam", 2, "", "")
    try:
        assert mup.lr_multiplier("_adam_hidden_probe", adam_hidden) == pytest.approx(0.25)
    finally:
        del mup.MUP_RULES["_adam_hidden_probe"]
    with pytest.raises(ValueError, match="MUP_RULES"):
        mup.lr_multiplier("embed", adam_hidden)  # a kind whose shape does not match its row fails loudly


def test_readout_rules():
    # SP: the record's 7.5*sqrt(d); muP: 7.5*sqrt(d0) with multiplier 1/m, equal at d == d0
    assert mup.softcap_divisor(768, None, False) == 7.5 * math.sqrt(768)
    assert mup.softcap_divisor(1024, 256, True) == 7.5 * math.sqrt(256)
    assert mup.output_multiplier(1024, 256, True) == 0.25
    assert mup.fp8_scales(768, None, False) == (math.sqrt(768) / 448, 24 / 448, 1 / 448)  # the record's scales
    assert mup.fp8_scales(1536, 768, True)[2] == pytest.approx(1 / 448 / 2)  # grad scale follows 1/m
    assert mup.fp8_scales(768, 768, True) == mup.fp8_scales(768, None, False)


def _train_losses(cfg, steps=6):
    from core.data import BatchLoader, resolve_data
    model = build_model(cfg, torch.device("cpu"))
    adam, muon, _ = build_optimizer_pair(model, cfg)
    loader = BatchLoader(resolve_data(None).train_files, cfg.seq_len, 1)
    losses = []
    for step in range(steps):
        losses.append(forward_backward(model, loader.next_step(), 2, 1).item())
        set_schedules(cfg, [adam, muon], muon, step)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    return losses, model


def test_mup_at_base_width_equals_standard_bitwise():
    sp_losses, sp_model = _train_losses(train_cfg())
    mup_losses, mup_model = _train_losses(train_cfg(mup=True, base_width=64))
    assert sp_losses == mup_losses  # bitwise, fp32 CPU
    for (n, a), (_, b) in zip(sp_model.named_parameters(), mup_model.named_parameters()):
        assert torch.equal(a, b), n
    # and it is not trivially equal: muP at another base width trains differently
    other, _ = _train_losses(train_cfg(mup=True, base_width=32))
    assert other != sp_losses


@pytest.mark.parametrize("width", [64, 256])
def test_initial_statistics_follow_the_rules(width):
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=4, width=width, head_dim=32, max_seq_len=64, mup=True, base_width=64))
    fc = model.blocks[0].mlp.c_fc.weight
    assert fc.std().item() == pytest.approx(0.5 / math.sqrt(width), rel=0.05)   # 1/sqrt(fan_in)
    qkv = model.blocks[0].attn.qkv_w
    assert qkv.std().item() == pytest.approx(0.5 / math.sqrt(width), rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)     # width-independent
    assert torch.all(model.lm_head.weight == 0) and torch.all(model.blocks[0].mlp.c_proj.weight == 0)
    assert model.lm_head.output_mult == 64 / width


MARGIN = 0.05  # the passing case clears SLOPE_TOL by this much, every failing case misses it by this much


def test_coordinate_check_passes_mup_and_rejects_sp_and_every_mistake_with_a_margin():
    """Byte proxy, widths 64-256, depth 2, 512 tokens/step, 3 seeds, steps 0-3: muP's worst judged slope stays
    MARGIN inside +-SLOPE_TOL; SP and each muP mistake have a judged type MARGIN outside it, the one theory
    names. (Widths from 32 fail muP's margin: the first readout update's sqrt(d) noise drops the step-1 logits
    from width 32 to 64, slope -0.12 to -0.14, and is flat from 64 on; README "Coordinate check".)"""
    widths, steps, seeds = [64, 128, 256], 4, [0, 1, 2]
    kw = dict(seq_len=512, depth=2, head_dim=16, data="embedded-bytes", log=lambda *_: None)
    tol = coord_check.SLOPE_TOL
    results = {}
    for name, use_mup, mistake in coord_check.parametrisations(sorted(mup.MUP_MISTAKES)):
        results[name] = verdict(slopes(measure(widths, steps, seeds, use_mup=use_mup, mistake=mistake, **kw), steps))
    judged = {k: v for k, v in results["muP"].items() if k not in coord_check.INFO_TYPES}
    assert max(abs(s) for _, s in judged.values()) <= tol - MARGIN, results["muP"]
    # the type that must reject each one, and the direction theory predicts
    expect = {"SP": ("logits", +1), "mistake:no-readout-mult": ("logits", +1),
              "mistake:readout-mult-squared": ("logits", -1), "mistake:muon-lr-over-m": ("attn", -1),
              "mistake:embed-lr-over-m": ("embed_delta", -1)}
    for name, (kind, sign) in expect.items():
        ok, worst = results[name][kind]
        assert not ok and sign * worst >= tol + MARGIN, (name, kind, results[name])
        assert not coord_check.passed(results[name])


def test_fixed_batch_repeats_the_first_batch_only():
    kw = dict(seq_len=128, depth=2, head_dim=16, log=lambda *_: None)
    fresh = measure([32, 64], 3, [0], use_mup=True, **kw)
    fixed = measure([32, 64], 3, [0], use_mup=True, fixed_batch=True, **kw)
    for w in (32, 64):
        assert fresh[w][0][0] == fixed[w][0][0]                  # step 0: the same first batch
        assert fresh[w][0][2]["embed"] != fixed[w][0][2]["embed"]  # later: other tokens vs the same ones
    # a repeated batch embeds the same tokens, so only the (trained) embedding changes its size
    assert abs(fixed[32][0][2]["embed"] / fixed[32][0][0]["embed"] - 1) < 0.2


def test_svd_orthogonalizer_changes_the_hidden_updates_only():
    kw = dict(seq_len=128, depth=2, head_dim=16, log=lambda *_: None)
    ns5 = measure([32], 3, [0], use_mup=True, **kw)[32][0]
    svd = measure([32], 3, [0], use_mup=True, orthogonalizer="svd", **kw)[32][0]
    assert ns5[:2] == svd[:2]  # steps 0-1: the hidden projections are still zero (lm_head starts at zero)
    assert ns5[2]["attn"] != svd[2]["attn"] and svd[2]["attn"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--widths", "32"], "at least two widths"),
    (["--widths", "32", "48", "--head-dim", "32"], "multiple of --head-dim"),
    (["--widths", "32", "64", "--seq-len", "100"], "multiple of 128"),
    (["--widths", "32", "64", "--orthogonalizer", "qr"], "invalid choice"),
    (["--widths", "32", "64", "--steps", "1"], "--steps must be >= 2"),
])
def test_coord_check_cli_rejects_bad_input_before_training(argv, needle, capsys, monkeypatch):
    monkeypatch.setattr(coord_check, "run_check", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exc:
        coord_check.main(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_coord_check_cli_rejects_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        coord_check.main(["--widths", "32", "64", "--device", "cuda"])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_probe_first_updates_reports_the_scale_invariance_of_the_first_step(capsys):
    """scripts/probe_first_updates.py: at step 1 the block outputs are still zero, so the loss cannot depend
    on the block lambdas (the final RMS norm removes x0's scale): their gradient is rounding noise."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "scripts" / "probe_first_updates.py"
    spec = importlib.util.spec_from_file_location("probe_first_updates", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    from core.data import resolve_data
    row = probe.probe(64, 32, 128, False, 2, 16, resolve_data(None).train_files)
    assert row["scalar_grad_max"] < 1e-4            # rounding noise
    assert 0.5 < row["s1_share"] <= 1.0 and 1 <= row["ns5_dirs"] <= row["polar_dirs"] <= 64
    lr_step = [abs(v) for v in row["lambda0_step"]]
    assert min(lr_step) > 0.01                       # yet Adam moved them by a full step
    assert probe.main(["--widths", "32", "48", "--seq-len", "128", "--head-dim", "16", "--depth", "2"]) == 0
    assert "block-0 lambdas moved by" in capsys.readouterr().out


@pytest.mark.gpu
def test_coordinate_check_runs_on_cuda_and_agrees_with_cpu_at_init():
    """GPU-only: the CUDA path (FlexAttention BlockMask, bf16 embeddings) records the same step-0 sizes."""
    kw = dict(seq_len=256, depth=2, head_dim=16, log=lambda *_: None)
    gpu = measure([32, 64], 2, [0], use_mup=True, device="cuda", **kw)
    cpu = measure([32, 64], 2, [0], use_mup=True, **kw)
    for w in (32, 64):
        for kind in ("embed", "residual"):
            assert gpu[w][0][0][kind] == pytest.approx(cpu[w][0][0][kind], rel=2e-2)
        assert all(math.isfinite(v) for row in gpu[w][0] for v in row.values())


def test_verdict_is_two_sided_and_fails_a_type_that_stays_zero():
    flat = [0.0, 0.01, -0.02, 0.03]
    base = {"embed": flat, "attn": [None, None, 0.05, -0.1], "mlp": [None, None, 0.1, 0.1], "residual": flat,
            "readout": [None, 0.9, 0.9, 0.9], "logits": [None, 0.1, -0.1, 0.05]}
    v = verdict(base)
    assert coord_check.passed(v), v                             # zero at steps 0-1 is the zero init; readout: info
    shrinking = verdict({**base, "logits": [None, -0.2, -0.3, -0.1]})
    assert not shrinking["logits"][0] and shrinking["logits"][1] == -0.3   # shrinking fails like growing
    dead = verdict({**base, "attn": [None, None, None, None]})
    assert not dead["attn"][0] and math.isnan(dead["attn"][1])             # never learns: FAIL, not skipped
    late = verdict({**base, "mlp": [None, None, 0.0, None]})
    assert not late["mlp"][0]                                               # zero again at step 3: FAIL


def test_logits_are_recorded_where_they_enter_the_soft_cap():
    cfg = train_cfg(width=64, depth=2, seq_len=128, batch_tokens=128, val_seq_len=128)
    model = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():
        model.lm_head.weight.normal_()
    rec = coord_check.CoordRecorder(model)
    from core.data import BatchLoader, resolve_data
    (inputs, targets), = BatchLoader(resolve_data(None).train_files, 128, 1).next_step()
    with rec.recording():
        model(inputs, targets, 1)
    row = rec.finish_step(0)
    assert row["CoordCheck/logits"] == pytest.approx(row["CoordCheck/readout"] / model.softcap_divisor, rel=1e-6)
    assert model.softcap_divisor == pytest.approx(7.5 * math.sqrt(64))  # SP: the width-dependent divisor


def test_mup_mistakes_are_refused_without_mup_and_change_only_their_rule():
    from core.config import ConfigError, validate
    with pytest.raises(ConfigError, match="needs --mup"):
        validate(train_cfg(mup_mistake="no-readout-mult"))
    assert mup.output_multiplier(128, 32, True, "no-readout-mult") == 1.0
    assert mup.output_multiplier(128, 32, True, "readout-mult-squared") == pytest.approx(1 / 16)
    assert mup.output_multiplier(128, 32, True) == pytest.approx(1 / 4)
    assert mup.mistake_lr_multiplier("hidden", 4.0, "muon-lr-over-m") == 0.25
    assert mup.mistake_lr_multiplier("lm_head", 4.0, "muon-lr-over-m") == 1.0
    assert mup.mistake_lr_multiplier("value_embed", 4.0, "embed-lr-over-m") == 0.25
    assert mup.mistake_lr_multiplier("hidden", 4.0, None) == 1.0


def test_lr_mult_scales_every_lr_of_both_optimizers():
    cfg1, cfg2 = train_cfg(width=32, depth=2), train_cfg(width=32, depth=2, lr_mult=2.0)
    (a1, m1, _), (a2, m2, _) = (build_optimizer_pair(build_model(c, torch.device("cpu")), c) for c in (cfg1, cfg2))
    for o1, o2 in ((a1, a2), (m1, m2)):
        assert [g["initial_lr"] * 2 for g in o1.param_groups] == [g["initial_lr"] for g in o2.param_groups]
