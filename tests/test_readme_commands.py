"""Every command in README.md's ```bash blocks runs as written on a CPU without network (issue 12).

`README_COMMANDS` maps each README command line to how this test runs it: a short form (the same entry
point and arguments, with fewer steps, small widths and a temporary log folder; the hardware defaults
that matter for the command, such as the CPU batch split over the ranks, are kept), or the reason it
cannot run here (network, several machines). `test_every_readme_command_is_covered` (fast) fails when the
README gains a command this table does not know: add it here with its short form.
`test_readme_commands_run` (slow, ~10 min on 2 cores) runs every short form:

    python -m pytest -m slow tests/test_readme_commands.py
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.logger import parse_step_line

ROOT = Path(__file__).resolve().parent.parent

# Appended to every train.py short form: 2 steps, a small validation set, every step logged.
SHORT = "--iterations 2 --val-tokens 4096 --log-every 1"
LOGS = "--log-dir {tmp}/logs"
# The sweep script passes its own --log-dir (SWEEP_DIR), so its EXTRA_ARGS only shrink the runs.
TINY_SWEEP = ('LR_MULTS="0.5 1 2" SWEEP_LR=adam SWEEP_DIR={tmp}/sweep EXTRA_ARGS="--depth 2 --head-dim 16 --seq-len 256 '
              '--batch-tokens 256 --val-seq-len 256 --val-tokens 1024 --val-every 0 --log-every 1"')
TINY_COORD = "--widths 32 64 --steps 2 --seeds 1 --depth 2 --head-dim 16 --seq-len 128 --out-dir {tmp}/coord"
NETWORK = "needs network (PyPI or the Hugging Face hub)"
NODES = "needs several machines"

# README command -> list of short forms (shell command lines), or the reason it does not run here.
README_COMMANDS: dict[str, list[str] | str] = {
    # Quickstart
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python train.py":
        [f"python train.py {SHORT} {LOGS}"],  # the training path with every CPU default (pip needs network)
    "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && .venv/bin/python -m pytest":
        "the test suite this test belongs to (pip needs network)",
    # Everyday commands
    "pip install -r requirements.txt": NETWORK,
    "bash scripts/data_process/download_hf_data.sh 9": NETWORK,
    "bash scripts/run_basic_speedrun.sh 768 1750 1337":
        [f'NPROC=1 EXTRA_ARGS="{SHORT} {LOGS}" bash scripts/run_basic_speedrun.sh 128 2 1337',
         f'NPROC=2 EXTRA_ARGS="{SHORT} {LOGS}" bash scripts/run_basic_speedrun.sh 128 2 1337'],
    "bash scripts/run_mup_width.sh 1024 768 1000 1337":
        [f'NPROC=1 EXTRA_ARGS="{SHORT} {LOGS}" bash scripts/run_mup_width.sh 128 64 2 1337',
         f'NPROC=2 EXTRA_ARGS="{SHORT} {LOGS}" bash scripts/run_mup_width.sh 128 64 2 1337'],
    'bash scripts/run_mup_width_group_scaling.sh 256 "512 768 1024 1536" 1000 1337':
        [f'NPROC=1 {TINY_SWEEP} bash scripts/run_mup_width_group_scaling.sh 32 "64" 2 1337',
         "python -m core.sweep collect {tmp}/sweep --base-width 32"],
    "python train.py --width 768 --iterations 1750": [f"python train.py --width 128 {SHORT} {LOGS}"],
    "python train.py --mup --width 1024 --base-width 768 --coord-check":
        [f"python train.py --mup --width 128 --base-width 64 --coord-check {SHORT} {LOGS}"],
    "torchrun --nproc_per_node=8 train.py --mup --width 1024 --base-width 768":
        [f"torchrun --standalone --nproc_per_node=2 train.py --mup --width 128 --base-width 64 {SHORT} {LOGS}"],
    "python train.py --width 256 --iterations 100 --use-wandb false":
        [f"python train.py --width 256 --use-wandb false {SHORT} {LOGS}"],
    "python train.py --mup --width 1024 --base-width 768 --coord-check --use-wandb true --wandb-project research":
        [f"WANDB_MODE=offline python train.py --mup --width 128 --base-width 64 --coord-check --use-wandb true "
         f"--wandb-project research {SHORT} {LOGS}"],
    "python train.py --width 512 --iterations 10 --log-every 1 --coord-check-every 5 --use-wandb true":
        [f"WANDB_MODE=offline python train.py --width 128 --coord-check-every 5 --use-wandb true {SHORT} {LOGS}"],
    "MONITOR_SPECTRAL_EVERY=10 MONITOR_ACTIVATIONS=true bash scripts/run_basic_speedrun.sh":
        [f'MONITOR_SPECTRAL_EVERY=1 MONITOR_ACTIVATIONS=true NPROC=1 EXTRA_ARGS="{SHORT} {LOGS}" '
         "bash scripts/run_basic_speedrun.sh"],
    "python -m core.mup coord-check --widths 64 128 256 512 --steps 10 --seeds 3":
        [f"python -m core.mup coord-check {TINY_COORD}"],
    "python -m core.sweep collect logs/sweep_<timestamp> --base-width 256": "run after the sweep script above",
    # muP: coordinate check
    "python -m core.mup coord-check --widths 32 64 128 256 --steps 10 --seeds 2 --head-dim 16 --seq-len 4096 "
    "--out-dir docs/coord_check": [f"python -m core.mup coord-check {TINY_COORD}"],
    "python -m core.coord_check --widths 64 128 256 --steps 4 --seeds 3 --seq-len 512 --depth 2 --head-dim 16 "
    "--data embedded-bytes --mistakes no-readout-mult readout-mult-squared muon-lr-over-m embed-lr-over-m":
        ["python -m core.coord_check --widths 32 64 --steps 2 --seeds 1 --seq-len 128 --depth 2 --head-dim 16 "
         "--data embedded-bytes --mistakes no-readout-mult --use-wandb false --out-dir {tmp}/coord2"],
    "python -m core.coord_check --widths 64 128 256 512 1024 --steps 10 --seeds 5 --seq-len 512 --depth 4 "
    "--head-dim 32 --data embedded-bytes --out-dir docs/coord_check/bytes_wide":
        ["python -m core.coord_check --widths 32 64 --steps 2 --seeds 2 --seq-len 128 --depth 4 --head-dim 32 "
         "--data embedded-bytes --use-wandb false --out-dir {tmp}/coord_wide"],
    "python -m core.coord_check --depths 2 4 8 16 --width 32 --head-dim 16 --seq-len 256 --steps 6 --seeds 2 "
    "--depth-mup completep --depth-mistakes depth-skips-unscaled depth-branch-no-lr --data embedded-bytes":
        ["python -m core.coord_check --depths 2 4 --width 32 --head-dim 16 --seq-len 128 --steps 2 --seeds 1 "
         "--depth-mup completep --depth-mistakes depth-skips-unscaled --data embedded-bytes --use-wandb false "
         "--out-dir {tmp}/depth_check"],
    "python train.py --mup --width 256 --base-width 64 --coord-check":
        [f"python train.py --mup --width 256 --base-width 64 --coord-check {SHORT} {LOGS}"],
    # muP: the transfer lab
    "SWEEP_JOBS=2 bash scripts/transfer_lab.sh":
        ['SWEEP_DIR={tmp}/lab WIDTHS="32 64" SEEDS=1 MISTAKE_SEEDS=1 STEPS=2 PARAMS=mup SWEPT=adam SWEEP_JOBS=2 '
         "bash scripts/transfer_lab.sh",
         "python -m core.sweep collect {tmp}/lab --use-wandb false"],
    "python -m core.sweep collect docs/transfer": "the collect short form of the transfer lab above",
    'SWEEP_JOBS=8 NPROC=1 SEEDS="1 2 3" MISTAKE_SEEDS="1 2" LR_MULTS="0.125 0.25 0.5 1 2 4 8" '
    'PARAMS="mup sp mistake:no-readout-mult:adam mistake:muon-lr-over-m:muon" '
    'bash scripts/run_mup_width_group_scaling.sh 256 "512 1024 2048" 1000': "needs 8 GPUs and FineWeb",
    # Distributed training
    "torchrun --standalone --nproc_per_node=8 train.py --mup --width 1024 --base-width 768":
        [f"torchrun --standalone --nproc_per_node=2 train.py {SHORT} {LOGS}"],  # the CPU defaults on 2 ranks
    "NPROC=8 bash scripts/run_basic_speedrun.sh 768 1750 1337": "as `NPROC=2 ... run_basic_speedrun.sh` above",
    "NPROC=2 bash scripts/run_basic_speedrun.sh": [f'NPROC=2 EXTRA_ARGS="{SHORT} {LOGS}" bash scripts/run_basic_speedrun.sh'],
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_id=job1 --rdzv_endpoint=node0:29500 "
    "train.py --mup --width 1024 --base-width 768": NODES,
    "NNODES=2 RDZV_ENDPOINT=node0:29500 bash scripts/run_mup_width.sh 1024 768 1000 1337": NODES,
    # Checkpoints: the same command for the first start and the restart (test_resume_auto_as_written)
    "python train.py --run-name exp1 --save-every 100 --resume auto": "test_resume_auto_as_written below",
}


def readme_commands() -> list[str]:
    """The command lines of README.md's ```bash blocks: continuations joined, comments and blanks dropped."""
    commands, block, pending = [], False, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        commands.append(re.sub(r"\s+", " ", pending + line))
        pending = ""
    return commands


def test_every_readme_command_is_covered():
    missing = [c for c in readme_commands() if c not in README_COMMANDS]
    assert not missing, ("README commands this test does not run (add a short form, or the reason it cannot "
                         f"run on a CPU without network, to README_COMMANDS in {__file__}):\n  " + "\n  ".join(missing))


def _env(tmp: Path) -> dict:
    venv_bin = str(Path(sys.executable).parent)  # `python` and `torchrun` are this interpreter's, as in a venv
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MONITOR_"))}
    return {**env, "PATH": venv_bin + os.pathsep + env.get("PATH", ""), "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", "WANDB_DIR": str(tmp), "DIST_TIMEOUT_S": "300"}


def _steps(out: str) -> list[dict]:
    return [s for s in map(parse_step_line, out.splitlines()) if s]


SHORT_FORMS = sorted({cmd for v in README_COMMANDS.values() if isinstance(v, list) for cmd in v},
                     key=lambda c: "core.sweep collect" in c)  # the collect runs after the sweeps


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    failures = []
    for template in SHORT_FORMS:
        cmd = template.format(tmp=tmp_path)
        t0 = time.time()
        proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                              timeout=900)
        out = proc.stdout + proc.stderr
        print(f"{time.time() - t0:6.1f} s  rc {proc.returncode}  {cmd}")
        if ("coord-check" in cmd or "coord_check" in cmd) and "train.py" not in cmd:
            # exit 1 is the check's FAIL verdict, which 2 steps at these sizes may give; it must reach one
            out_dir = Path(cmd.split("--out-dir ")[1].split()[0])
            ok = (proc.returncode in (0, 1) and ("PASS" in out or "FAIL" in out)
                  and ((out_dir / "coord_check.png").is_file() or (out_dir / "depth_check.png").is_file()))
        elif "core.sweep collect" in cmd:
            sweep_dir = Path(cmd.split("collect ")[1].split()[0])
            ok = proc.returncode == 0 and "csv:" in out and (sweep_dir / "sweep.csv").is_file()
        elif "group_scaling" in cmd:  # 2 parametrisations x 2 widths x 3 LRs, then the collect
            ok = proc.returncode == 0 and " 0 failed" in proc.stdout and "csv:" in proc.stdout
        elif "transfer_lab.sh" in cmd:  # 7 LRs x 2 widths, no collect (the next short form collects)
            ok = proc.returncode == 0 and "14 finished, 0 failed" in proc.stdout
        else:  # a training run: it must reach its last step
            steps = _steps(proc.stdout)
            ok = proc.returncode == 0 and bool(steps) and steps[-1]["step"] == steps[-1]["total"] == 2
            if "nproc_per_node=2" in cmd or "NPROC=2" in cmd:
                ok = ok and "2 rank(s) x " in proc.stdout
        if not ok:
            failures.append(f"$ {cmd}\n(rc {proc.returncode})\n{out[-2500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_resume_auto_as_written(tmp_path):
    """README: `python train.py --run-name exp1 --save-every 100 --resume auto` is the same command for the first
    start and every restart. Short form: 3 steps, checkpoint every step; the first start is stopped with SIGTERM
    after step 1, the same command then resumes and finishes."""
    cmd = [sys.executable, "train.py", "--run-name", "exp1", "--save-every", "1", "--resume", "auto",
           "--iterations", "3", "--val-tokens", "4096", "--log-every", "1", "--log-dir", str(tmp_path / "logs")]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    lines = []
    for line in first.stdout:
        lines.append(line)
        step = parse_step_line(line)
        if step and step["step"] >= 1 and "train_loss" in step:
            first.send_signal(signal.SIGTERM)
            break
    rest, _ = first.communicate(timeout=300)
    assert first.returncode == 3, "".join(lines) + rest
    second = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    steps = _steps(second.stdout)
    assert "resume:" in second.stdout and steps[-1]["step"] == steps[-1]["total"] == 3
    assert min(s["step"] for s in steps if "train_loss" in s) >= 2  # it continued, it did not start again
