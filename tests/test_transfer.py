"""The transfer verdict (core/transfer.py) on synthetic sweeps whose truth is known: it recovers a known
eta* and a known drift through seed noise, passes a width-independent optimum and fails a drifting one."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from core import transfer

WIDTHS = (32, 64, 128, 256)
GRID = [2.0 ** k for k in range(-3, 4)]  # x 1/8 .. x 8 around a base LR of 1.0 (log2 LR = -3..3)


def synthetic_rows(drift: float, seeds=(1, 2, 3), noise: float = 0.004, x0: float = 0.3, curvature: float = 0.06,
                   gain_per_doubling: float = 0.05, param: str = "muP", swept: str = "adam", rng_seed: int = 0):
    """Loss = L0(width) + curvature (log2 LR - x*(width))^2 + noise, x*(width) = x0 + drift log2(width/32)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for w in WIDTHS:
        x_star = x0 + drift * math.log2(w / WIDTHS[0])
        for s in seeds:
            offset = rng.normal(0, noise)  # a seed's whole curve moves a little, as real seeds do
            for lr in GRID:
                loss = 2.5 - gain_per_doubling * math.log2(w / WIDTHS[0]) + curvature * (math.log2(lr) - x_star) ** 2
                rows.append({"parametrisation": param, "swept": swept, "width": w, "lr": lr, "lr_mult": lr,
                             "seed": s, "final_val_loss": loss + offset + rng.normal(0, noise), "status": "done"})
    return rows


def test_quadratic_fit_finds_an_off_grid_optimum():
    xs = np.arange(-3, 4, dtype=float)
    fit = transfer.optimum(xs, 1.0 + 0.1 * (xs - 0.4) ** 2)
    assert fit["x_star"] == pytest.approx(0.4, abs=1e-9) and not fit["edge"]
    edge = transfer.optimum(xs, 1.0 + 0.1 * (xs - 5.0) ** 2)  # optimum beyond the grid: kept inside, flagged
    assert edge["edge"] and edge["x_star"] <= 3.0


def test_diverged_points_are_left_out_of_the_fit():
    xs = np.arange(-3, 4, dtype=float)
    ys = 1.0 + 0.1 * (xs - 0.0) ** 2
    ys[-2:] = np.nan  # the two highest LRs diverged
    fit = transfer.optimum(xs, ys)
    assert math.isfinite(fit["x_star"]) and abs(fit["x_star"]) < 0.2


def test_width_independent_optimum_passes_and_is_recovered():
    v = transfer.analyse(synthetic_rows(drift=0.0), base_width=32)
    assert v["verdict"] == "PASS", v["reasons"]
    for w in WIDTHS:
        e = v["eta_star"][str(w)]
        assert e["log2_mean"] == pytest.approx(0.3, abs=0.15)
        assert e["log2_low"] <= e["log2_mean"] <= e["log2_high"]
    assert v["drift"]["low"] <= 0.0 <= v["drift"]["high"]
    assert all(p["ok"] for p in v["wider_is_better"])


@pytest.mark.parametrize("drift", [-0.5, 0.5, -1.0])
def test_drifting_optimum_fails_with_its_drift_measured(drift):
    v = transfer.analyse(synthetic_rows(drift=drift), base_width=32)
    assert v["verdict"] == "FAIL"
    assert v["drift"]["slope"] == pytest.approx(drift, abs=0.1)
    assert v["drift"]["low"] <= drift + 0.1 and v["drift"]["high"] >= drift - 0.1
    assert any("drift interval" in r for r in v["reasons"])


def test_small_drift_inside_the_tolerance_passes():
    assert transfer.analyse(synthetic_rows(drift=0.08), base_width=32)["verdict"] == "PASS"


def test_regret_fails_a_sweep_whose_wider_models_gain_little():
    # optimum moves one grid step at the widest width only (drift small overall) and wider barely helps
    rows = synthetic_rows(drift=0.0, gain_per_doubling=0.002, curvature=0.08)
    for r in rows:
        if r["width"] == 256:
            r["final_val_loss"] += 0.08 * ((math.log2(r["lr"]) - 1.3) ** 2 - (math.log2(r["lr"]) - 0.3) ** 2)
    v = transfer.analyse(rows, base_width=32)
    assert not v["regret"]["256"]["ok"] and v["verdict"] == "FAIL"


def test_verdicts_keyed_by_parametrisation_and_swept_lr():
    rows = synthetic_rows(0.0) + synthetic_rows(-0.5, param="SP") + synthetic_rows(0.0, swept="muon") \
        + synthetic_rows(-1.0, param="mistake:no-readout-mult")
    result = transfer.verdicts(rows, 32)
    assert set(result) == {"muP/adam", "SP/adam", "muP/muon", "mistake:no-readout-mult/adam"}
    assert [result[k]["verdict"] for k in ("muP/adam", "SP/adam", "muP/muon", "mistake:no-readout-mult/adam")] \
        == ["PASS", "FAIL", "PASS", "FAIL"]
    text = transfer.report(result)
    assert "+-0.25" in text and "SP/adam: FAIL" in text and "muP/adam: PASS" in text


def test_too_little_data_is_incomplete_never_pass():
    one_seed = transfer.analyse(synthetic_rows(drift=0.0, seeds=(1,)), base_width=32)
    assert one_seed["verdict"] == "INCOMPLETE" and any("needs >= 2" in r for r in one_seed["reasons"])
    one_seed_drift = transfer.analyse(synthetic_rows(drift=-1.0, seeds=(1,)), base_width=32)
    assert one_seed_drift["verdict"] == "INCOMPLETE"  # no interval: a FAIL is not backed either
    rows = [r for r in synthetic_rows(drift=0.0) if r["lr"] == 1.0]  # one LR per width: no optimum to fit
    assert transfer.analyse(rows, base_width=32)["verdict"] == "INCOMPLETE"
    edge = transfer.analyse(synthetic_rows(drift=0.0, x0=3.4), base_width=32)  # the optimum beyond the grid
    assert edge["verdict"] == "INCOMPLETE" and any("edge" in r for r in edge["reasons"])
    leaving = transfer.analyse(synthetic_rows(drift=1.0, x0=0.0), base_width=32)  # drifts off the grid: still FAIL
    assert leaving["verdict"] == "FAIL"


def test_a_seed_still_in_progress_is_left_out_not_judged():
    done = synthetic_rows(drift=0.0, seeds=(1, 2))
    # seed 3 has run 3 LRs at two widths, with losses that would drag the optimum far off and fail the sweep
    running = [dict(r, seed=3, final_val_loss=r["final_val_loss"] + (0.5 if r["lr"] < 1 else 0.0))
               for r in synthetic_rows(drift=0.0, seeds=(1,)) if r["width"] in (32, 64) and r["lr"] in (0.5, 1.0, 2.0)]
    alone = transfer.analyse(done, base_width=32)
    mixed = transfer.analyse(done + running, base_width=32)
    assert alone["verdict"] == mixed["verdict"] == "PASS" and mixed["seeds"] == [1, 2]
    assert mixed["drift"] == alone["drift"] and mixed["in_progress"] == {"3": {"runs": 6, "grid": 28}}
    assert "in progress: seed 3 has 6 of 28 runs" in transfer.report({"muP/adam": mixed})
    # seed 2 stopped inside its widest curve: left out, and one seed cannot certify anything
    one_left = transfer.analyse([r for r in done if not (r["seed"] == 2 and r["width"] == 256 and r["lr"] != 1.0)],
                                base_width=32)
    assert one_left["verdict"] == "INCOMPLETE" and one_left["seeds"] == [1]
    assert one_left["in_progress"] == {"2": {"runs": 22, "grid": 28}}


def test_models_that_did_not_learn_are_incomplete_whatever_their_drift():
    # the old README sweep: every loss above the unigram entropy; no verdict, PASS or FAIL, stands on it
    def with_entropy(rows, entropy):
        return [dict(r, unigram_entropy=entropy) for r in rows]
    learned = transfer.analyse(with_entropy(synthetic_rows(drift=0.0), 4.0), base_width=32)  # best ~2.35 < 3.0
    assert learned["verdict"] == "PASS" and learned["learned"]["ok"]
    assert learned["learned"]["limit"] == pytest.approx(0.75 * 4.0)
    for drift in (0.0, -1.0):  # limit 2.44: widths 32 and 64 (best ~2.50, ~2.45) have not learned enough
        flat = transfer.analyse(with_entropy(synthetic_rows(drift=drift), 3.25), base_width=32)
        assert flat["verdict"] == "INCOMPLETE", drift
        assert "not learned beyond token frequencies" in flat["reasons"][0]
        assert set(flat["learned"]["not_below"]) == {"32", "64"}
    assert transfer.analyse(synthetic_rows(drift=0.0), base_width=32)["learned"] is None  # no entropy: no check


def test_the_verdict_reaches_wandb_as_a_summary_run_with_figures_and_the_eta_table(tmp_path, monkeypatch):
    """Offline, as on a machine without network: the run's files hold the figures (wandb.Image), the eta*
    table (wandb.Table) and the verdicts, in a run named after the sweep folder."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    # where the run's files went: an earlier test's wandb.init can fix the folder for the whole session
    real_init, folders = wandb.init, []

    def spying_init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        folders.append(Path(run.dir).parent)
        return run

    monkeypatch.setattr(wandb, "init", spying_init)
    rows = synthetic_rows(0.0) + synthetic_rows(-0.5, param="SP")
    result = transfer.verdicts(rows, 32)
    sweep_dir = tmp_path / "lab"
    sweep_dir.mkdir()
    figures = [transfer.plot_curves(rows, result, sweep_dir / "transfer.png"),
               transfer.plot_drift(result, sweep_dir / "drift.png")]
    transfer.log_to_wandb(sweep_dir, result, figures, required=True)
    (run,) = folders
    assert run.name.startswith("offline-run-")
    media = run / "files" / "media"
    assert {p.name.split("_")[0] for p in (media / "images" / "transfer").glob("*.png")} == {"transfer", "drift"}
    (table,) = (media / "table" / "transfer").glob("eta_star_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"][:3] == ["key", "width", "eta_star"] and len(data["data"]) == 2 * len(WIDTHS)
    assert {(r[0], r[6]) for r in data["data"]} == {("muP/adam", "PASS"), ("SP/adam", "FAIL")}
    record = next(run.glob("run-*.wandb")).read_bytes()  # the run's summary and config: a binary log
    assert b"verdict/muP/adam" in record and b"lab-transfer-verdict" in record and b"speedrun-mup-group" in record
