"""`bash scripts/gpu_check.sh --dry-run`: the prepared GPU check's plumbing, on CPU at toy size (issue 13 item 7).

Every section runs (gpu tests, both training runs, the coordinate check), the table is printed and the JSON
holds what the README quotes after a real GPU run. The numbers of a dry run mean nothing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), "--log-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True
    for section in ("gpu_tests", "fp8_on", "fp8_off", "coord_check"):
        assert str(res[section]["status"]).startswith("ok"), (section, res[section])
    on, off = res["fp8_on"], res["fp8_off"]
    assert on["fp8_mode"] == "fp8" and off["fp8_mode"] == "off"  # --fp8 on runs torch._scaled_mm on CPU too
    assert on["train_losses"].keys() == off["train_losses"].keys() and on["step_avg_ms"] > 0
    assert {"train", "val"} <= set(on["peak_memory_mib"])
    assert set(res["coord_check"]["verdicts"]) == {"muP", "SP"}
    for row in ("step time, 1 GPU, accum 8", "record, 8xH100 -> 1 GPU", "fp8 on vs off train loss", "compiled graphs"):
        assert row in proc.stdout, row
