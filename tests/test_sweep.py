"""Sweep tooling: bad width lists stop before any run; collection, optimum report and figure from run folders."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from core import sweep
from core.logger import format_step_line

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("targets,expect", [("", "empty"), ("64 100", "multiple of --head-dim")])
def test_bad_width_lists_fail_before_training(tmp_path, targets, expect):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "SWEEP_DIR": str(tmp_path / "sw")}
    proc = subprocess.run(["bash", "scripts/run_mup_width_group_scaling.sh", "32", targets, "5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expect in proc.stderr
    assert not (tmp_path / "sw").exists()  # nothing started


def fake_run(root: Path, name: str, *, width: int, mup: bool, adam_lr: float, loss: float):
    run = root / name
    run.mkdir(parents=True)
    cfg = {"width": width, "mup": mup, "adam_lr": adam_lr, "muon_lr": sweep.DEFAULT_LR["muon"], "seed": 1}
    (run / "config.json").write_text(json.dumps(cfg))
    lines = [format_step_line(0, 10, val_loss=11.0, train_time_ms=0, step_avg_ms=0),
             format_step_line(10, 10, val_loss=loss, train_time_ms=100, step_avg_ms=10)]
    (run / "console.log").write_text("\n".join(lines) + "\n")


def test_collect_report_and_figure(tmp_path):
    # muP: optimum at 2x for both widths; SP: the wider model's optimum moves down by two grid steps
    grid = {0.5: 0, 1.0: 1, 2.0: 2, 4.0: 3}
    for mult, i in grid.items():
        lr = sweep.DEFAULT_LR["adam"] * mult
        for w in (32, 128):
            fake_run(tmp_path, f"mup_adam_w{w}_lrx{mult}", width=w, mup=True, adam_lr=lr, loss=5 + abs(i - 2) * 0.1)
        fake_run(tmp_path, f"sp_adam_w32_lrx{mult}", width=32, mup=False, adam_lr=lr, loss=5 + abs(i - 2) * 0.1)
        fake_run(tmp_path, f"sp_adam_w128_lrx{mult}", width=128, mup=False, adam_lr=lr, loss=5 + abs(i - 0) * 0.1)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text(json.dumps({"width": 64, "mup": True}))
    rows = sweep.collect(tmp_path)
    assert len(rows) == 16
    best = sweep.optima(rows)
    assert best[("muP", "adam")][32][0] == best[("muP", "adam")][128][0] == pytest.approx(0.016)
    assert best[("SP", "adam")][128][0] == pytest.approx(0.004)
    report = sweep.transfer_report(rows, 32)
    assert "SHIFTED" in report.split("SP / adam")[1] and "SHIFTED" not in report.split("SP / adam")[0]
    assert sweep.main(["collect", str(tmp_path), "--base-width", "32"]) == 0
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 17
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
