"""Prepared GPU check (issue 13 item 7): the CUDA paths that have never run, measured in a few minutes.

    bash scripts/gpu_check.sh              # one H100/H200, at most ~8 minutes: one table + bench/results/gpu_check.json
    bash scripts/gpu_check.sh --dry-run    # the same plumbing on CPU at toy size (tests/test_gpu_check.py runs it)

Sections, each in its own process with a time limit taken from one overall budget (a section that does not
fit what is left is reported as skipped, never silently dropped):

  gpu_tests     `pytest -m gpu`: the CUDA-only tests (FP8 kernels, coord check on CUDA, no host sync, ...)
  fp8_on        the record configuration on one GPU (12 x 768, 8 x 48k tokens per step = grad accumulation 8)
                for --steps steps with --fp8 on: step time next to the record's 8-GPU step time scaled to one
                GPU, graphs compiled before / during the timed loop (recompiles), peak memory per phase, MFU
  fp8_off       the same steps with --fp8 off (FP8 on vs off losses) and two coordinate-check steps, which
                run the eager module: their peak memory is the eager-step memory of issue 13 item 1 (the
                unfused FlexAttention path would need ~6 x 49k^2 fp32 scores per layer and not fit)
  coord_check   `python -m core.coord_check` on CUDA, widths 256-1024, 5 steps: muP and SP verdicts

The record's numbers come from its log (records/track_1_short/2025-07-12_BosAlign/0c5449cc-...txt in
KellerJordan/modded-nanogpt): 1750 steps in 173,209 ms on 8 x H100, i.e. 98.98 ms per step. A short run with
--iterations N walks the whole window schedule (128 -> 1792 tokens) in N steps, so its mean step time is
compared with the record's whole-run mean. Scaled to one GPU: 8 x 98.98 = 791.8 ms per step (perfect scaling:
8 micro-batches on one GPU instead of one on each of 8, without the gradient communication).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECORD_STEP_MS_8GPU = 173_209 / 1750  # record log: step:1750/1750 ... train_time:173209ms step_avg:98.98ms
RECORD_GPUS = 8
RECORD_STEP_MS_1GPU = RECORD_STEP_MS_8GPU * RECORD_GPUS

# Toy sizes for --dry-run (CPU): the same sections and flags, small enough for a test.
# (2 micro-batches: gradient accumulation runs, at a quarter of the record's 8; no compile: inductor's C++
# build alone would take minutes on a CPU, so the compile counters read 0 and there is no eager phase.)
DRY_TRAIN = ["--device", "cpu", "--width", "32", "--depth", "2", "--head-dim", "16", "--seq-len", "128",
             "--batch-tokens", str(2 * 128), "--val-seq-len", "128", "--val-tokens", "128", "--compile", "false"]
# The record's configuration is train.py's CUDA default (core/config.py CUDA_DEFAULTS); only the validation
# is cut to one 262,144-token sequence (the record's val_seq_len: the phase whose logits need the most memory).
GPU_TRAIN = ["--device", "cuda", "--val-tokens", str(4 * 64 * 1024)]


# ---------------------------------------------------------------------------------------------
# Child: one training run in this process, with the counters only an in-process run can read


def child_train(out_json: str, train_args: list[str]) -> int:
    from core.memory import configure_cuda_allocator
    configure_cuda_allocator()  # as train.py does, before torch loads
    import torch
    from torch._dynamo.utils import counters

    from core.config import parse_args
    from core.distributed import setup_distributed, teardown
    from core.trainer import Trainer

    captured: dict = {}

    class CountingTrainer(Trainer):
        """The trainer of train.py, reading the compile counters once the kernel warm-up is done."""

        def _warm_up_kernels(self) -> None:
            super()._warm_up_kernels()
            captured["after_warmup"] = _dynamo_counts(counters)

    cfg = parse_args(train_args)
    t = time.perf_counter()
    info = setup_distributed(cfg.device)  # as core.trainer.run
    try:
        run = CountingTrainer(cfg, info)
        result = run.train()
    finally:
        teardown(info)
    wall_s = time.perf_counter() - t
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "Time/step_avg_ms" in r]
    end_counts = _dynamo_counts(counters)
    before = captured.get("after_warmup", {"graphs": 0, "frames": 0})
    peaks = run.peaks
    out = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.device != "cpu" else "cpu",
        "config": {k: getattr(cfg, k) for k in ("width", "depth", "seq_len", "batch_tokens", "iterations", "fp8",
                                                  "compile", "warmup_steps")},
        "wall_s": wall_s,
        "train_losses": {r["step"]: r["Loss/train_loss"] for r in rows if "Loss/train_loss" in r},
        "final_val_loss": result.final_val_loss,
        "step_avg_ms": logged[-1]["Time/step_avg_ms"] if logged else None,
        # mean step time between the first and the last log step: leaves out step 1's one-off costs
        "steady_step_ms": ((logged[-1]["Time/training_time_ms"] - logged[0]["Time/training_time_ms"])
                           / (logged[-1]["step"] - logged[0]["step"]) if len(logged) > 1 else None),
        "mfu": logged[-1].get("Perf/mfu") if logged else None,
        "tokens_per_second": logged[-1].get("Perf/tokens_per_second") if logged else None,
        "peak_memory_mib": dict(peaks.peaks_mib),
        "graphs_before_timed_loop": before["graphs"],
        "graphs_during_timed_loop": end_counts["graphs"] - before["graphs"],  # recompiles inside the timed run
        "fp8_mode": json.loads((result.run_dir / "config.json").read_text())["resolved"]["fp8_mode"],
    }
    Path(out_json).write_text(json.dumps(out, indent=1))
    return 0


def _dynamo_counts(counters) -> dict:
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)), "frames": int(counters["frames"].get("ok", 0))}


# ---------------------------------------------------------------------------------------------
# Parent: the sections, the budget, the table


class Budget:
    def __init__(self, total_s: float):
        self.end = time.monotonic() + total_s

    def left(self) -> float:
        return self.end - time.monotonic()


def run_section(name: str, cmd: list[str], want_s: float, budget: Budget, log_dir: Path) -> dict:
    """Run one section's command with timeout min(want_s, what is left); its output goes to log_dir/name.log."""
    limit = min(want_s, budget.left())
    if limit < 10:
        return {"status": "skipped", "why": f"{budget.left():.0f} s of the budget left"}
    t = time.perf_counter()
    log_path = log_dir / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit:.0f} s"
    return {"status": status, "seconds": round(time.perf_counter() - t, 1), "log": str(log_path)}


def train_section(name: str, args: list[str], want_s: float, budget: Budget, log_dir: Path) -> dict:
    out_json = log_dir / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-train", str(out_json), "--",
           *args, "--log-dir", str(log_dir / "runs"), "--run-name", name]
    res = run_section(name, cmd, want_s, budget, log_dir)
    if res["status"] == "ok" and out_json.exists():
        res.update(json.loads(out_json.read_text()))
    return res


def gpu_tests_section(dry: bool, want_s: float, budget: Budget, log_dir: Path) -> dict:
    # dry run: only this file's gpu tests, which skip on CPU (the plumbing: collection, parsing); for real: all
    targets = ["tests/test_gpu_paths.py"] if dry else []
    res = run_section("gpu_tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider",
                                    "-rfEs", *targets], want_s, budget, log_dir)
    text = Path(res["log"]).read_text() if "log" in res else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    counts.pop("deselected", None)
    res["counts"] = counts
    if res["status"] == "exit 1" and counts.get("failed", 0) == 0 and counts.get("errors", 0) == 0:
        res["status"] = "ok"
    if res["status"] == "exit 5":  # pytest: no test collected (e.g. -m gpu matched nothing)
        res["status"] = "ok (no gpu tests collected)"
    return res


def coord_section(dry: bool, want_s: float, budget: Budget, log_dir: Path) -> dict:
    if dry:
        args = ["--widths", "16", "32", "--steps", "2", "--seeds", "1", "--seq-len", "128", "--depth", "2",
                "--head-dim", "16", "--device", "cpu"]
    else:
        args = ["--widths", "256", "512", "1024", "--steps", "5", "--seeds", "1", "--device", "cuda"]
    res = run_section("coord_check", [sys.executable, "-m", "core.coord_check", *args, "--use-wandb", "false",
                                      "--out-dir", str(log_dir / "coord_check")], want_s, budget, log_dir)
    text = Path(res["log"]).read_text() if "log" in res else ""
    res["verdicts"] = dict(re.findall(r"^(muP|SP): (PASS|FAIL)", text, flags=re.M))
    res["widths"] = [int(w) for w in args[1:args.index("--steps")]]
    if res["status"] == "exit 1" and res["verdicts"]:  # exit 1 = muP verdict FAIL: a result, not a crash
        res["status"] = "ok"
    return res


def fmt_mib(peaks: dict | None) -> str:
    return ", ".join(f"{k} {v:,.0f}" for k, v in (peaks or {}).items()) or "-"


def table(results: dict, dry: bool) -> str:
    rows = []
    g = results["gpu_tests"]
    rows.append(("gpu tests", f"{g['status']}: " + ", ".join(f"{n} {k}" for k, n in g.get("counts", {}).items())))
    on, off = results["fp8_on"], results["fp8_off"]
    for name, r in (("fp8 on", on), ("fp8 off", off)):
        if r.get("status") != "ok":
            rows.append((f"record config, {name}", r.get("status", "") + " " + r.get("why", "")))
    if on.get("status") == "ok":
        steady = on.get("steady_step_ms") or on.get("step_avg_ms")
        rows.append(("device", on["device"]))
        rows.append(("step time, 1 GPU, accum 8", f"{on['step_avg_ms']:.1f} ms/step avg, {steady:.1f} steady "
                     f"({on['config']['iterations']} steps, fp8 {on['fp8_mode']})"))
        rows.append(("record, 8xH100 -> 1 GPU", f"{RECORD_STEP_MS_8GPU:.2f} ms x 8 = {RECORD_STEP_MS_1GPU:.1f} ms/step"
                     + ("" if dry else f" | ratio {steady / RECORD_STEP_MS_1GPU:.2f}")))
        rows.append(("compiled graphs", f"{on['graphs_before_timed_loop']} in warm-up, "
                     f"{on['graphs_during_timed_loop']} during the timed loop (recompiles)"))
        rows.append(("peak memory MiB (fp8 on)", fmt_mib(on.get("peak_memory_mib"))))
        rows.append(("MFU", "unavailable (CPU)" if on.get("mfu") is None else f"{100 * on['mfu']:.1f} %"))
    if on.get("status") == "ok" and off.get("status") == "ok":
        steps = sorted(set(on["train_losses"]) & set(off["train_losses"]), key=int)
        diffs = [abs(on["train_losses"][s] - off["train_losses"][s]) for s in steps]
        rows.append(("fp8 on vs off train loss", f"max |diff| {max(diffs):.4f} over steps {steps[0]}..{steps[-1]}; "
                     f"final val {on['final_val_loss']:.4f} vs {off['final_val_loss']:.4f}"))
        mem = off.get("peak_memory_mib", {})
        rows.append(("eager-step memory (item 1)", (f"train_eager {mem['train_eager']:,.0f} MiB vs compiled train "
                                                    f"{mem.get('train', float('nan')):,.0f} MiB") if "train_eager" in mem
                     else "n/a (no compiled model, so no eager phase)"))
    c = results["coord_check"]
    rows.append((f"coord check {c.get('widths', '')}", f"{c['status']}: "
                 + ", ".join(f"{k} {v}" for k, v in c.get("verdicts", {}).items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-train":
        return child_train(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    p = argparse.ArgumentParser(prog="bash scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check the plumbing")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; dry run 2)")
    p.add_argument("--budget-s", type=float, default=480, help="overall time limit in seconds (default 8 minutes)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_check.json; "
                                               "dry run: logs/gpu_check_dry_run/gpu_check.json)")
    p.add_argument("--log-dir", default=None, help="folder for the sections' logs and runs (default logs/gpu_check_*)")
    a = p.parse_args(argv)
    dry = a.dry_run
    steps = a.steps or (2 if dry else 30)
    if not dry:
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA device here: run with --dry-run to check the plumbing on CPU")
    log_dir = Path(a.log_dir) if a.log_dir else REPO / "logs" / (
        "gpu_check_dry_run" if dry else f"gpu_check_{time.strftime('%Y%m%d_%H%M%S')}")
    if dry and (log_dir / "runs").is_dir():
        shutil.rmtree(log_dir / "runs")  # the dry run's fixed folder: start afresh each time
    log_dir.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else (log_dir / "gpu_check.json" if dry else REPO / "bench" / "results" / "gpu_check.json")
    budget = Budget(a.budget_s)
    base = DRY_TRAIN if dry else GPU_TRAIN
    common = [*base, "--iterations", str(steps), "--log-every", str(max(1, steps // 6)), "--val-every", "0",
              "--spectral-every", "0", "--use-wandb", "false", "--warmup-steps", "1" if dry else "3"]
    # seconds each section may take at most (the budget caps the sum): compile dominates the training runs
    want = {"gpu_tests": 120, "fp8_on": 150, "fp8_off": 130, "coord_check": 80}
    results = {"dry_run": dry, "machine": platform.node(), "python": sys.version.split()[0]}
    t0 = time.perf_counter()
    results["gpu_tests"] = gpu_tests_section(dry, want["gpu_tests"], budget, log_dir)
    results["fp8_on"] = train_section("fp8_on", [*common, "--fp8", "on"], want["fp8_on"], budget, log_dir)
    results["fp8_off"] = train_section("fp8_off", [*common, "--fp8", "off", "--coord-check", "--coord-check-steps", "2"],
                                       want["fp8_off"], budget, log_dir)
    results["coord_check"] = coord_section(dry, want["coord_check"], budget, log_dir)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    results["record_step_ms_8gpu"], results["record_step_ms_1gpu_scaled"] = RECORD_STEP_MS_8GPU, RECORD_STEP_MS_1GPU
    import torch
    results["torch"] = torch.__version__
    text = table(results, dry)
    results["table"] = text
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(("GPU check DRY RUN (CPU, toy sizes: plumbing only, the numbers mean nothing)\n" if dry else "GPU check\n")
          + text + f"\n{results['total_s']:.0f} s in all | JSON: {out} | logs: {log_dir}")
    failed = [k for k in ("gpu_tests", "fp8_on", "fp8_off", "coord_check") if not str(results[k]["status"]).startswith("ok")]
    if failed:
        print(f"not ok: {', '.join(failed)} (see their logs)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
