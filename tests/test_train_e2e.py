"""train.py end to end through a subprocess, as a user runs it: step lines, run folder, metrics.jsonl."""
import json
import os
import subprocess
import sys
from pathlib import Path

from core.logger import parse_step_line

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--width", "32", "--depth", "2", "--head-dim", "16", "--seq-len", "256", "--batch-tokens", "512",
        "--val-seq-len", "256", "--val-tokens", "1024", "--iterations", "6", "--log-every", "2", "--val-every", "3"]


def test_train_py_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "DIST_TIMEOUT_S")}
    proc = subprocess.run([sys.executable, "train.py", *TINY, "--log-dir", str(tmp_path), "--run-name", "e2e"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [parse_step_line(l) for l in proc.stdout.splitlines()]
    steps = [l for l in lines if l]
    assert [s["step"] for s in steps if "val_loss" in s] == [0, 3, 6]
    assert [s["step"] for s in steps if "train_loss" in s] == [2, 4, 6]
    assert all(s["total"] == 6 for s in steps)
    assert steps[0]["val_loss"] > steps[-1]["val_loss"]  # six steps already lower the validation loss
    assert "using the embedded corpus" in proc.stdout
    # issue 21: torch parsed the allocator setting train.py set before it loaded; the loss path and the timeout
    assert "CUDA allocator: does not apply on cpu" in proc.stdout
    assert "torch's effective setting: 'expandable_segments:True'" in proc.stdout
    assert "loss path: auto: eager measuring steps and validation in row chunks" in proc.stdout
    assert "process-group timeout: 1800 s (30 min)" in proc.stdout

    run = tmp_path / "e2e"
    for name in ("training.log", "console.log", "config.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["width"] == 32 and config["iterations"] == 6 and config["mup"] is False
    assert config["resolved"]["dist_timeout_s"] == 1800.0 and config["chunked_loss"] == "auto"
    assert config["resolved"]["chunked_loss"] == {"train": False, "eager": True, "val": True}
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r["Loss/train_loss"] for r in rows if "Loss/train_loss" in r}
    val_rows = {r["step"]: r["Loss/val_loss"] for r in rows if "Loss/val_loss" in r}
    assert sorted(train_rows) == [2, 4, 6] and sorted(val_rows) == [0, 3, 6]
    for s in steps:  # the console and metrics.jsonl report the same numbers
        if "val_loss" in s:
            assert abs(val_rows[s["step"]] - s["val_loss"]) < 1e-4
    assert (run / "console.log").read_text().strip().splitlines()[-1] in proc.stdout
