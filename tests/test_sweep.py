"""Sweep tooling: bad width lists stop before any run; the runner runs N at a time, records a failed run
and goes on, resumes a killed sweep where it was; collection writes the CSV, verdict.json and figures."""
import json
import subprocess
import sys
import time
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


def test_plan_orders_seed_by_seed_from_the_default_lr_outward():
    plan = sweep.make_plan(widths=[32, 64], seeds=[1, 2], params=["mup", "mistake:no-readout-mult:adam"],
                           swept=["adam", "muon"], lr_mults=[0.25, 0.5, 1, 2, 4], mistake_seeds=[1])
    assert len(plan) == 2 * (2 + 2) * 5 + 1 * 2 * 5  # muP: 2 seeds x 2 swept x 2 widths x 5; the mistake: 1 seed
    assert [r.mult for r in plan[:6:2]] == [1, 0.5, 2]
    assert {r.seed for r in plan[:30]} == {1} and plan[-1].seed == 2
    mistake = [r for r in plan if r.param.startswith("mistake")]
    assert {r.swept for r in mistake} == {"adam"}
    assert mistake[0].train_args(32)[-7:] == ["--mup", "--base-width", "32", "--mup-mistake", "no-readout-mult",
                                              "--adam-lr", "0.008"]
    with pytest.raises(sweep.ConfigError, match="mistake"):
        sweep.make_plan(widths=[32], seeds=[1], params=["mistake:typo:adam"], swept=["adam"], lr_mults=[1])


FAKE_RUN = """
import json, pathlib, sys, time
args = sys.argv[1:]
name, log_dir = args[args.index("--run-name") + 1], pathlib.Path(args[args.index("--log-dir") + 1])
width, lr = int(args[args.index("--width") + 1]), float(args[args.index("--adam-lr") + 1])
run = log_dir / name
run.mkdir(parents=True, exist_ok=True)
(log_dir / "started.txt").open("a").write(name + " " + str(time.time()) + "\\n")
if width == 64 and lr > 0.01:
    sys.exit("boom: a crashing run")
time.sleep(0.6)
(run / "config.json").write_text(json.dumps({"width": width, "mup": True, "adam_lr": lr, "muon_lr": 0.05, "seed": 1}))
(run / "console.log").write_text({line!r} + "\\n")
(run / "summary.json").write_text(json.dumps({"total_steps": 10}))
"""


def test_runner_runs_in_parallel_records_failures_and_resumes(tmp_path, monkeypatch):
    line = format_step_line(10, 10, val_loss=2.5, train_time_ms=10, step_avg_ms=1)
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_RUN.replace("{line!r}", repr(line)))
    monkeypatch.setattr(sweep, "_command", lambda r, b, t, d, n, p: [sys.executable, str(script), *r.train_args(b),
                                                                      "--log-dir", str(d), "--run-name", r.name])
    plan = sweep.make_plan(widths=[32, 64], seeds=[1], params=["mup"], swept=["adam"], lr_mults=[1, 2])
    logs = []
    t0 = time.perf_counter()
    counts = sweep.run_sweep(tmp_path / "sw", plan, 32, [], jobs=2, log=logs.append)
    assert time.perf_counter() - t0 < 4 * 0.6 + 2.5  # 3 sleeping runs, 2 at a time
    assert counts == {"done": 3, "failed": 1, "skipped": 0, "stopped": 0}
    failed = json.loads((tmp_path / "sw" / "mup_adam_w64_lrx2_s1.failed").read_text())
    assert failed["exit_code"] == 1 and "boom" in failed["tail"][-1]
    assert any("FAILED mup_adam_w64_lrx2_s1" in m and "goes on" in m for m in logs)
    # a second run of the same sweep skips the done runs and the recorded failure...
    again = sweep.run_sweep(tmp_path / "sw", plan, 32, [], jobs=2, log=logs.append)
    assert again == {"done": 0, "failed": 0, "skipped": 4, "stopped": 0}
    # ...and resumes an interrupted one (a folder without a finished summary)
    (tmp_path / "sw" / "mup_adam_w32_lrx1_s1" / "summary.json").unlink()
    third = sweep.run_sweep(tmp_path / "sw", plan, 32, [], jobs=1, log=logs.append)
    assert third["done"] == 1 and third["skipped"] == 3
    rows = sweep.collect(tmp_path / "sw")
    assert sorted(r["status"] for r in rows) == ["done", "done", "done", "failed"]


def fake_run(root: Path, name: str, *, width: int, mup: bool, adam_lr: float, loss: float, seed: int = 1):
    run = root / name
    run.mkdir(parents=True)
    cfg = {"width": width, "mup": mup, "adam_lr": adam_lr, "muon_lr": sweep.DEFAULT_LR["muon"], "seed": seed,
           "data": "embedded", "val_tokens": 32768, "val_seq_len": 256}  # GPT-2 tokens: bigram 4.43 > these losses
    (run / "config.json").write_text(json.dumps(cfg))
    lines = [format_step_line(0, 10, val_loss=11.0, train_time_ms=0, step_avg_ms=0),
             format_step_line(10, 10, val_loss=loss, train_time_ms=100, step_avg_ms=10)]
    (run / "console.log").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text(json.dumps({"total_steps": 10, "total_time_s": 36.0,
                                                       "unigram_entropy": 5.0}))


def test_collect_writes_csv_verdict_and_figures(tmp_path, capsys):
    # muP: optimum at x2 at every width; SP: the optimum falls by a factor 2 per doubling of width
    mults = [0.125, 0.25, 0.5, 1, 2, 4, 8]
    for seed in (1, 2, 3):
        for mult in mults:
            lr = sweep.DEFAULT_LR["adam"] * mult
            for w in (32, 64, 128):
                k = (w // 32).bit_length() - 1  # 0, 1, 2
                x = __import__("math").log2(mult)
                fake_run(tmp_path, f"mup_adam_w{w}_lrx{mult}_s{seed}", width=w, mup=True, adam_lr=lr, seed=seed,
                         loss=3 - 0.05 * k + 0.05 * (x - 1) ** 2 + 0.001 * seed)
                fake_run(tmp_path, f"sp_adam_w{w}_lrx{mult}_s{seed}", width=w, mup=False, adam_lr=lr, seed=seed,
                         loss=3 - 0.05 * k + 0.05 * (x - 1 + k) ** 2 + 0.001 * seed)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text(json.dumps({"width": 64, "mup": True}))
    assert sweep.main(["collect", str(tmp_path), "--base-width", "32", "--use-wandb", "false"]) == 0
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 1 + 3 * 7 * 3 * 2
    out = capsys.readouterr().out
    assert "126 timed, 1.26 h summed" in out  # 126 runs x 36 s: what the sweep cost, and per key
    assert "muP/adam" in out and "63 runs    0.63 h" in out
    row = sweep.read_csv(tmp_path / "sweep.csv")[0]
    assert row["run_s"] == 36.0 and row["bigram_xent"] == pytest.approx(4.426, abs=0.01)  # core/baselines.py
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["muP/adam"]["verdict"] == "PASS" and verdict["SP/adam"]["verdict"] == "FAIL"
    assert verdict["SP/adam"]["drift"]["slope"] == pytest.approx(-1.0, abs=0.05)
    assert verdict["muP/adam"]["eta_star"]["64"]["mean"] == pytest.approx(0.016, rel=0.05)
    table = (tmp_path / "verdict.md").read_text().splitlines()  # the README's table: one row per key
    mup_row = next(line for line in table if line.startswith("| `muP/adam`"))
    assert "**PASS**" in mup_row and "| 0.016" in mup_row  # eta* at x2 of the default 0.008, width 32 first
    sp_row = next(line for line in table if line.startswith("| `SP/adam`"))
    assert "**FAIL**" in sp_row and "| -1.00 [" in sp_row  # the drift column
    for png in ("transfer.png", "drift.png", "head_to_head.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert verdict["muP/adam"]["learned"]["ok"] and verdict["muP/adam"]["learned"]["bigram_xent"] > 4.4
    assert "**muP vs SP, adam LR**" in (tmp_path / "verdict.md").read_text()
    # a second look without the base width: printed, nothing written over the sweep's own verdict
    written = (tmp_path / "verdict.json").read_text()
    assert sweep.main(["collect", str(tmp_path), "--widths", "64", "128", "--use-wandb", "false"]) == 0
    out = capsys.readouterr().out
    assert "widths [64, 128] only (nothing written)" in out and "SP/adam: FAIL" in out and "muP/adam: PASS" in out
    assert (tmp_path / "verdict.json").read_text() == written


@pytest.mark.parametrize("code", [3, 143])
def test_a_run_stopped_by_a_signal_is_resumed_later_not_recorded_as_failed(tmp_path, monkeypatch, code):
    monkeypatch.setattr(sweep, "_command", lambda r, b, t, d, n, p: [sys.executable, "-c", f"raise SystemExit({code})"])
    plan = sweep.make_plan(widths=[32], seeds=[1], params=["sp"], swept=["adam"], lr_mults=[1])
    counts = sweep.run_sweep(tmp_path / "sw", plan, 32, [], log=lambda *_: None)
    assert counts["stopped"] == 1 and counts["failed"] == 0
    assert sweep.run_state(tmp_path / "sw", plan[0].name) == "todo"  # the next run of the sweep takes it again


TINY = ["--data", "embedded-bytes", "--depth", "2", "--head-dim", "16", "--seq-len", "128", "--batch-tokens", "256",
        "--iterations", "6", "--val-every", "0", "--val-seq-len", "128", "--val-tokens", "2048", "--window-max", "128",
        "--log-every", "2", "--use-wandb", "false"]


def _losses(run_dir: Path) -> tuple:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary["final_val_loss"], [(r["step"], r.get("Loss/train_loss"), r.get("Optimization/grad_norm"))
                                       for r in rows]


def test_fork_launcher_trains_bitwise_like_a_fresh_process(tmp_path):
    """core/launch.py: a run forked from the sweep process equals the same run as `python train.py`, to the bit."""
    for launcher in ("exec", "fork"):
        proc = subprocess.run([sys.executable, "-m", "core.sweep", "run", str(tmp_path / launcher), "--base-width",
                               "16", "--widths", "16", "32", "--seeds", "3", "--params", "mup", "--swept", "adam",
                               "--lr-mults", "2", "--jobs", "2", "--launcher", launcher, "--no-collect", "--", *TINY],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"({launcher} launcher)" in proc.stdout and "2 finished, 0 failed" in proc.stdout
    for name in ("mup_adam_w16_lrx2_s3", "mup_adam_w32_lrx2_s3"):
        exec_run, fork_run = _losses(tmp_path / "exec" / name), _losses(tmp_path / "fork" / name)
        assert len(exec_run[1]) >= 3 and exec_run == fork_run


def test_a_forked_run_reports_its_exit_code_and_output(tmp_path):
    """A bad flag in a forked child: argparse's exit 2 and its message reach the parent, as from a process."""
    code = ("import sys, time; from pathlib import Path; from core import launch; launch.preload(); "
            f"r = launch.ForkedRun(['--no-such-flag'], Path({str(tmp_path / 'x.out')!r}), {{'PATH': '/bin'}}); "
            "exec('while r.poll() is None: time.sleep(0.05)'); print(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "2", proc.stdout + proc.stderr
    assert "unrecognized arguments: --no-such-flag" in (tmp_path / "x.out").read_text()


def test_launcher_choice():
    from core.launch import resolve_launcher
    assert resolve_launcher("auto", 1, cuda=False) == "fork"
    assert resolve_launcher("auto", 1, cuda=True) == "exec" and resolve_launcher("auto", 8, cuda=False) == "exec"
    with pytest.raises(ValueError, match="--launcher exec"):
        resolve_launcher("fork", 1, cuda=True)
