"""Depth muP (core/depth_mup.py): L == L0 trains bitwise like the run without it, the factors follow the rule
table's formulas (computed here by hand, not by the code under test), and bad combinations are refused before
the first step with a message that names the fix. The depth coordinate check and sweeps are issue 20, items 3-5."""
import pytest
import torch

from core import depth_mup
from core.config import ConfigError, validate
from core.trainer import build_model
from test_mup import _train_losses as _train  # the same few-step training loop as the width-muP tests
from test_mup import train_cfg as _mup_train_cfg


def train_cfg(**kw):
    return _mup_train_cfg(**{"width": 32, "head_dim": 16, **kw})


@pytest.mark.parametrize("rule", ["completep", "sqrt"])
def test_depth_mup_at_base_depth_equals_standard_bitwise(rule):
    sp_losses, sp_model = _train(train_cfg(), steps=4)
    losses, model = _train(train_cfg(depth_mup=rule, base_depth=4), steps=4)
    assert losses == sp_losses  # bitwise, fp32 CPU
    for (n, a), (_, b) in zip(sp_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    # not trivially equal: the same rule with a smaller base depth trains differently
    other, _ = _train(train_cfg(depth_mup=rule, base_depth=2), steps=4)
    assert other != sp_losses


def test_factors_follow_the_formulas_at_four_times_the_base_depth():
    m = 16 / 4
    # CompleteP (alpha 1): branch (L0/L)^1, hidden LR m^0, block lambdas m^-1, skips forward L0/L with eps m^-1,
    # eps of the in-branch vectors m^-alpha; embeddings and readout unchanged
    assert depth_mup.branch_multiplier(16, 4, "completep") == pytest.approx(1 / m)
    assert depth_mup.skip_multiplier(16, 4, "completep") == pytest.approx(1 / m)
    assert depth_mup.factors("hidden", 16, 4, "completep") == pytest.approx((1.0, 1.0))
    assert depth_mup.factors("block_lambdas", 16, 4, "completep") == pytest.approx((1 / m, 1.0))
    assert depth_mup.factors("attn_lambdas", 16, 4, "completep") == pytest.approx((1.0, 1 / m))
    assert depth_mup.factors("value_embed", 16, 4, "completep") == pytest.approx((1.0, 1 / m))
    assert depth_mup.factors("skip_weights", 16, 4, "completep") == pytest.approx((1.0, 1 / m))
    assert depth_mup.factors("embed", 16, 4, "completep") == (1.0, 1.0)
    assert depth_mup.factors("lm_head", 16, 4, "completep") == (1.0, 1.0)
    # sqrt (alpha 0.5): branch m^-1/2, hidden LR m^(0.5-1) = 1/2 at m = 4
    assert depth_mup.branch_multiplier(16, 4, "sqrt") == pytest.approx(0.5)
    assert depth_mup.factors("hidden", 16, 4, "sqrt") == pytest.approx((0.5, 1.0))
    assert depth_mup.factors("attn_lambdas", 16, 4, "sqrt") == pytest.approx((0.5, 0.5))
    # the controls: the no-LR mistake drops every factor, the unscaled-skips one only the skip multiplier
    assert depth_mup.factors("block_lambdas", 16, 4, "completep", "depth-branch-no-lr") == (1.0, 1.0)
    assert depth_mup.skip_multiplier(16, 4, "completep", "depth-skips-unscaled") == 1.0
    assert depth_mup.branch_multiplier(16, 4, "completep", "depth-skips-unscaled") == pytest.approx(1 / m)


def test_the_factors_reach_the_parameters_and_every_parameter_has_a_rule():
    model = build_model(train_cfg(depth=8, depth_mup="completep", base_depth=2), torch.device("cpu"))
    table = depth_mup.apply_depth_mup(model)
    assert set(table) == {n for n, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    assert params["block_lambdas"].lr_mul == pytest.approx(1 / 4)
    assert params["skip_weights"].eps_mul == pytest.approx(1 / 4)
    assert all(b.branch_mult == pytest.approx(1 / 4) for b in model.blocks)


@pytest.mark.parametrize("kw, needle", [
    (dict(base_depth=2), "add --depth-mup"),
    (dict(depth_mup="completep"), "needs --base-depth"),
    (dict(depth_mup="completep", base_depth=8), "larger than --depth"),
    (dict(depth_mup="sqrt", base_depth=3), "even number"),
    (dict(depth_mistake="depth-skips-unscaled"), "it needs --depth-mup"),
])
def test_bad_depth_combinations_are_refused_with_the_fix(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(train_cfg(**kw))


def test_the_run_start_printout_names_the_rules_and_the_layout_change():
    text = depth_mup.describe(8, 2, "completep")
    assert "m_L 4" in text and "branch multiplier 0.25" in text and "skip multiplier 0.25" in text
    assert "value-embedding tables 1 at the base depth, 3 here" in text
    assert "NEGATIVE CONTROL" in depth_mup.describe(8, 2, "completep", "depth-skips-unscaled")


def test_depth_coordinate_check_passes_completep_and_fails_sp_and_unscaled_skips(tmp_path):
    # measured at this size (depths 2-16, 2 seeds): completep's stream slope +0.01, SP-in-depth +1.12 (the U-net
    # skips and the unscaled branches add up linearly in L), unscaled skips +0.89 (predicted -> +1; +0.8 over 2-32)
    from core import coord_check as cc
    report = cc.run_depth_check([2, 4, 8], 6, [0], tmp_path, rule="completep", mistakes=["depth-skips-unscaled"],
                                width=32, seq_len=256, head_dim=16, data="embedded-bytes", log=lambda *a: None)
    assert cc.passed(report["completep"]["verdict"])
    assert not cc.passed(report["SP"]["verdict"])
    assert not cc.passed(report["mistake:depth-skips-unscaled"]["verdict"])
    stream = {name: r["verdict"]["stream"][1] for name, r in report.items()}
    assert abs(stream["completep"]) < 0.15 and stream["SP"] > 0.6 and stream["mistake:depth-skips-unscaled"] > 0.5
    assert (tmp_path / "depth_check.png").exists()


def test_the_sqrt_rule_is_judged_against_its_lazy_per_block_update():
    from core import coord_check as cc
    assert cc.depth_expected("sqrt") == {"block_update": -0.5}
    table = {"block_update": [None, -0.49, -0.50, -0.52], "stream": [None, 0.01, 0.0, -0.02]}
    assert cc.passed(cc.verdict(table, cc.depth_expected("sqrt")))
    assert not cc.passed(cc.verdict(table, cc.depth_expected("completep")))  # flat is what completep wants
