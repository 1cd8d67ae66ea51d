"""Width x LR sweeps: plan the runs, run them N at a time (resumable), collect them into a CSV.

    python -m core.sweep run logs/sweep_X --base-width 32 --widths 32 64 128 256 --seeds 1 2 3 \
        --params mup sp --swept adam muon --lr-mults 0.125 0.25 0.5 1 2 4 8 --jobs 2 -- --iterations 150
    python -m core.sweep collect logs/sweep_X          # sweep.csv, the transfer verdict (core/transfer.py), figures
    python -m core.sweep check-widths 64 128 256       # validate widths before a sweep starts

`scripts/run_mup_width_group_scaling.sh` is the user-facing front end (it maps its arguments and env
vars onto `run`). A sweep folder holds one run folder per run (config.json, console.log, summary.json,
written by train.py), `plan.json` (what each run is: parametrisation, swept LR, width, multiplier,
seed), and `<run>.failed` for a run that exited with an error (its output is kept in `<run>.out`).

Parametrisations: `mup`, `sp`, and negative controls `mistake:<name>:<swept>` (muP with
`--mup-mistake <name>`, swept only on `<swept>`; core/mup.py MUP_MISTAKES). Swept quantities: `adam`
(the Adam LR, Muon at its default), `muon` (the Muon LR), `lr` (`--lr-mult`: both together), and one Adam
group alone, the others at the record's: `adam-embed` (embeddings and value embeddings, `--embed-lr-mult`),
`adam-head` (the readout, `--head-lr-mult`), `adam-scalar` (skip weights and lambdas, `--scalar-lr-mult`).

Resuming: a run whose summary.json records `total_steps` is done and skipped; a run that was
interrupted is started again with `--resume auto` (it continues from its checkpoint if it wrote one,
e.g. on SIGTERM). A failed run is recorded and not retried unless `--retry-failed`; the sweep goes on.
SIGTERM/SIGINT to the sweep forwards SIGTERM to its runs (each finishes its step, checkpoints, exits 3).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core import launch, transfer, transfer_report
from core.config import ConfigError, TrainConfig, parse_args, resolve_defaults, validate
from core.logger import parse_step_line
from core.mup import MUP_MISTAKES

DEFAULT_LR = {"adam": TrainConfig.adam_lr, "muon": TrainConfig.muon_lr, "lr": 1.0,
              "adam-embed": 1.0, "adam-head": 1.0, "adam-scalar": 1.0}  # the last three: one Adam group alone
SWEPT_FLAG = {"adam": "--adam-lr", "muon": "--muon-lr", "lr": "--lr-mult", "adam-embed": "--embed-lr-mult",
              "adam-head": "--head-lr-mult", "adam-scalar": "--scalar-lr-mult"}
SWEPT = tuple(DEFAULT_LR)
FIELDS = ["parametrisation", "swept", "width", "lr", "lr_mult", "seed", "final_val_loss", "steps", "status", "run",
          "run_s", "unigram_entropy", "bigram_xent", "code"]
# run_s: the run's wall time (summary.json total_time_s), what the sweep cost; unigram_entropy: of the validation
# tokens (summary.json), the verdict's line between a trained and a diverged run; bigram_xent: a bigram fitted on
# the training tokens, scored on the validation tokens (core/baselines.py), the verdict's "learned" gate;
# code: the commit the run trained at (config.json resolved.code; empty for runs older than that field)
PLAN_FILE = "plan.json"
# train.py's exit 3 (SIGTERM/SIGINT: checkpointed), 128+N (a second signal: no checkpoint), -N (killed by N)
STOPPED_CODES = {3, 130, 143, -2, -9, -15}


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PlannedRun:
    param: str   # "muP", "SP" or "mistake:<name>"
    swept: str   # "adam" | "muon" | "lr"
    width: int
    mult: float  # x the default of the swept quantity
    seed: int

    @property
    def name(self) -> str:
        tag = {"muP": "mup", "SP": "sp"}.get(self.param, self.param.replace(":", "-"))
        return f"{tag}_{self.swept}_w{self.width}_lrx{self.mult:g}_s{self.seed}"

    @property
    def lr(self) -> float:
        return DEFAULT_LR[self.swept] * self.mult

    def train_args(self, base_width: int) -> list[str]:
        args = ["--width", str(self.width), "--seed", str(self.seed)]
        if self.param != "SP":
            args += ["--mup", "--base-width", str(base_width)]
        if self.param.startswith("mistake:"):
            args += ["--mup-mistake", self.param.split(":", 1)[1]]
        return args + [SWEPT_FLAG[self.swept], f"{self.lr:.6g}"]


def parse_param(spec: str) -> list[tuple[str, str | None]]:
    """'mup' -> [("muP", None)]; 'mistake:no-readout-mult:adam' -> [("mistake:no-readout-mult", "adam")]."""
    if spec == "mup":
        return [("muP", None)]
    if spec == "sp":
        return [("SP", None)]
    parts = spec.split(":")
    if len(parts) == 3 and parts[0] == "mistake" and parts[1] in MUP_MISTAKES and parts[2] in SWEPT:
        return [(f"mistake:{parts[1]}", parts[2])]
    raise ConfigError(f"parametrisation {spec!r}: use mup, sp, or mistake:<name>:<swept> with a name from "
                      f"{sorted(MUP_MISTAKES)} and swept one of {list(SWEPT)}")


def make_plan(*, widths: list[int], seeds: list[int], params: list[str], swept: list[str],
              lr_mults: list[float], mistake_seeds: list[int] | None = None) -> list[PlannedRun]:
    """Every run, in the order that makes partial results most useful: seed by seed (a whole seed's picture
    first), then each parametrisation and swept LR, LR multipliers from the default outward, then widths."""
    bad = [s for s in swept if s not in SWEPT]
    if bad:
        raise ConfigError(f"swept {bad}: choose from {list(SWEPT)}")
    if not widths or not seeds or not lr_mults:
        raise ConfigError("a sweep needs at least one width, seed and LR multiplier")
    sets = []
    for spec in params:
        for param, only in parse_param(spec):
            for which in ([only] if only else swept):
                sets.append((param, which))
    mults = sorted(lr_mults, key=lambda m: (abs(math.log2(m)), m))  # 1, 0.5, 2, 0.25, 4, ...
    plan = []
    for seed in sorted(set(seeds) | set(mistake_seeds or [])):
        for param, which in sets:
            is_mistake = param.startswith("mistake:")
            if seed not in (mistake_seeds if is_mistake and mistake_seeds is not None else seeds):
                continue
            plan += [PlannedRun(param, which, w, m, seed) for m in mults for w in widths]
    return plan


def write_plan(sweep_dir: Path, plan: list[PlannedRun], base_width: int, train_args: list[str]) -> None:
    """plan.json: the union of every plan run in this folder (a resumed sweep may add seeds or widths)."""
    path = sweep_dir / PLAN_FILE
    old = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    runs = dict(old.get("runs", {}))
    runs.update({r.name: asdict(r) for r in plan})
    path.write_text(json.dumps({"base_width": base_width, "train_args": train_args, "runs": runs}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Running: N at a time, resumable


def run_state(sweep_dir: Path, name: str) -> str:
    """done | diverged (stopped by a non-finite loss: a result, not an error) | failed | todo (never started,
    or interrupted: resumed with --resume auto)."""
    summary = sweep_dir / name / "summary.json"
    if summary.exists():
        try:
            keys = json.loads(summary.read_text())
        except ValueError:
            keys = {}
        if "total_steps" in keys:
            return "done"
        if "nonfinite_step" in keys:
            return "diverged"
    if (sweep_dir / f"{name}.failed").exists():
        return "failed"
    return "todo"


def _slot_env(slot: int, jobs: int, nproc: int) -> dict[str, str]:
    """One thread per run when several share a CPU; on CUDA run k gets GPUs [k*nproc, (k+1)*nproc)."""
    env = dict(os.environ)
    gpus = torch.cuda.device_count()
    if gpus:
        if jobs * nproc > gpus:
            raise ConfigError(f"SWEEP_JOBS={jobs} x NPROC={nproc} needs {jobs * nproc} GPUs, this node has {gpus}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * nproc + i) for i in range(nproc))
    elif jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _train_argv(run: PlannedRun, base_width: int, train_args: list[str], sweep_dir: Path,
                wandb_project: str) -> list[str]:
    """train.py's flags for one planned run."""
    return [*run.train_args(base_width), "--log-dir", str(sweep_dir), "--run-name", run.name, "--resume", "auto",
            "--wandb-project", wandb_project, "--wandb-group", sweep_dir.name, *train_args]


def _command(run: PlannedRun, base_width: int, train_args: list[str], sweep_dir: Path, nproc: int,
             wandb_project: str) -> list[str]:
    """The command line of one planned run as a fresh process (the exec launcher)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + ["train.py", *_train_argv(run, base_width, train_args, sweep_dir, wandb_project)]


def run_sweep(sweep_dir: Path, plan: list[PlannedRun], base_width: int, train_args: list[str], *, jobs: int = 1,
              nproc: int = 1, retry_failed: bool = False, wandb_project: str = "speedrun-mup-group",
              launcher: str = "exec", log=print) -> dict[str, int]:
    """Run every planned run not yet done, `jobs` at a time. Returns counts {done, failed, skipped, stopped}.
    `launcher`: "exec" starts each run as a fresh process, "fork" forks this one (core/launch.py)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if launcher == "fork":
        launch.preload()
    write_plan(sweep_dir, plan, base_width, train_args)
    todo = []
    counts = {"done": 0, "failed": 0, "skipped": 0, "stopped": 0}
    for r in plan:
        state = run_state(sweep_dir, r.name)
        if state in ("done", "diverged") or (state == "failed" and not retry_failed):
            counts["skipped"] += 1
            continue
        (sweep_dir / f"{r.name}.failed").unlink(missing_ok=True)
        todo.append(r)
    log(f"sweep {sweep_dir}: {len(plan)} runs planned, {counts['skipped']} already done or failed, "
        f"{len(todo)} to run, {jobs} at a time ({launcher} launcher)")
    running: dict[int, tuple[PlannedRun, object, float]] = {}  # slot -> (run, process, start)
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        for _, proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        queue = list(todo)
        while queue or running:
            while queue and len(running) < jobs and not stopping:
                slot = next(i for i in range(jobs) if i not in running)
                r = queue.pop(0)
                proc = launch.start(_train_argv(r, base_width, train_args, sweep_dir, wandb_project),
                                    sweep_dir / f"{r.name}.out", _slot_env(slot, jobs, nproc), launcher,
                                    _command(r, base_width, train_args, sweep_dir, nproc, wandb_project))
                running[slot] = (r, proc, time.perf_counter())
            time.sleep(0.2)
            for slot, (r, proc, t0) in list(running.items()):
                code = proc.poll()
                if code is not None:
                    del running[slot]
                    _finish(sweep_dir, r, code, time.perf_counter() - t0, counts, log)
            if stopping:
                queue.clear()  # the running ones checkpoint and exit 3; the rest waits for the next `run`
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return counts


def _finish(sweep_dir: Path, r: PlannedRun, code: int, seconds: float, counts: dict, log) -> None:
    out = sweep_dir / f"{r.name}.out"
    if code == 0:
        counts["done"] += 1
        found = final_val_loss(sweep_dir / r.name)
        out.unlink(missing_ok=True)  # console.log has the same lines
        log(f"  done   {r.name} ({seconds:.0f}s): val_loss {found[0]:.4f}" if found else f"  done   {r.name}")
    elif code == 4:  # train.py: a non-finite loss or gradient; at a too-high LR that is the result
        counts["done"] += 1
        out.unlink(missing_ok=True)
        log(f"  diverged {r.name} ({seconds:.0f}s): non-finite loss, recorded as such")
    elif code in STOPPED_CODES:  # a signal: an interruption, not a bad run; the next `run` resumes it
        counts["stopped"] += 1
        how = "checkpointed" if code == 3 else f"exit {code}, killed by a signal"
        log(f"  stopped {r.name} ({how}; resumes on the next run of the sweep)")
    else:
        counts["failed"] += 1
        tail = out.read_text().strip().splitlines()[-3:] if out.exists() else []
        (sweep_dir / f"{r.name}.failed").write_text(json.dumps({"exit_code": code, "tail": tail}) + "\n")
        log(f"  FAILED {r.name} (exit {code}): {tail[-1] if tail else ''} -- recorded, the sweep goes on")


# ---------------------------------------------------------------------------------------------
# Collecting


def final_val_loss(run_dir: Path) -> tuple[float, int] | None:
    """(val loss, step) of the last validation step line in the run's console log, None if it has none."""
    last = None
    log = run_dir / "console.log"
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        parsed = parse_step_line(line)
        if parsed and parsed.get("val_loss") is not None:
            last = (parsed["val_loss"], parsed["step"])
    return last


def _describe(run_dir: Path, cfg: dict, planned: dict | None) -> tuple[str, str, float, float]:
    """(parametrisation, swept, lr, mult) of a run: from plan.json, else from its config and name."""
    if planned is not None:
        r = PlannedRun(**planned)
        return r.param, r.swept, r.lr, r.mult
    param = "SP" if not cfg.get("mup") else (f"mistake:{cfg['mup_mistake']}" if cfg.get("mup_mistake") else "muP")
    name = run_dir.name
    if "_lr_" in name or cfg.get("lr_mult", 1.0) != 1.0:
        swept = "lr"
    elif "_muon_" in name or ("_adam_" not in name and cfg.get("muon_lr") != DEFAULT_LR["muon"]):
        swept = "muon"
    else:
        swept = "adam"
    lr = cfg.get("lr_mult", 1.0) if swept == "lr" else cfg[f"{swept}_lr"]
    return param, swept, lr, lr / DEFAULT_LR[swept]


def collect(sweep_dir: Path, log=print) -> list[dict]:
    """One row per finished run (final val loss), plus the failed runs of plan.json (status "failed"), each with
    the n-gram references of the data it trained on (computed once per data setting)."""
    plan = json.loads((sweep_dir / PLAN_FILE).read_text())["runs"] if (sweep_dir / PLAN_FILE).exists() else {}
    refs: dict[tuple, dict] = {}
    rows = []
    for cfg_path in sorted(sweep_dir.glob("*/config.json")):
        run_dir = cfg_path.parent
        state = run_state(sweep_dir, run_dir.name)
        if state == "failed":
            continue
        found = (float("nan"), json.loads((run_dir / "summary.json").read_text())["nonfinite_step"]) \
            if state == "diverged" else final_val_loss(run_dir)
        if found is None:
            continue
        cfg = json.loads(cfg_path.read_text())
        param, swept, lr, mult = _describe(run_dir, cfg, plan.get(run_dir.name))
        loss, step = found
        summary = run_dir / "summary.json"
        info = json.loads(summary.read_text()) if summary.exists() else {}
        ref = _references(cfg, refs, log)
        rows.append({"parametrisation": param, "swept": swept, "width": cfg["width"], "lr": lr, "lr_mult": mult,
                     "seed": cfg["seed"], "final_val_loss": loss if math.isfinite(loss) else float("nan"),
                     "steps": step, "status": "done" if math.isfinite(loss) else "diverged", "run": run_dir.name,
                     "run_s": info.get("total_time_s", ""),
                     "unigram_entropy": info.get("unigram_entropy", ref.get("unigram_entropy", "")),
                     "bigram_xent": ref.get("bigram_xent", ""), "code": cfg.get("resolved", {}).get("code", "")})
    for name, planned in plan.items():
        if run_state(sweep_dir, name) == "failed":
            r = PlannedRun(**planned)
            rows.append({"parametrisation": r.param, "swept": r.swept, "width": r.width, "lr": r.lr, "lr_mult": r.mult,
                         "seed": r.seed, "final_val_loss": float("nan"), "steps": 0, "status": "failed", "run": name})
    return rows


def _references(cfg: dict, cache: dict, log) -> dict:
    """The n-gram references (core/baselines.py) of the data a run's config names; {} when the data cannot be
    read here (the verdict then says it has no bigram reference, and is INCOMPLETE)."""
    spec = (cfg.get("data"), cfg.get("data_dir"), cfg.get("val_tokens"), cfg.get("val_seq_len") or 1024)
    if spec not in cache:
        from core.baselines import references
        try:
            cache[spec] = references(*spec)
        except Exception as e:  # missing data on the collecting machine: said, and the verdict shows it
            log(f"warning: no n-gram references for data {spec[0] or spec[1] or 'default'} ({e}); the verdicts "
                "that need them are INCOMPLETE")
            cache[spec] = {}
    return cache[spec]


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["parametrisation"], r["swept"], r["width"], r["lr"], r["seed"])):
            w.writerow({k: r.get(k, "") for k in FIELDS})
    return path


def read_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({**r, "width": int(r["width"]), "lr": float(r["lr"]), "lr_mult": float(r["lr_mult"]),
                         "seed": int(r["seed"]), "final_val_loss": float(r["final_val_loss"] or "nan"),
                         "steps": int(r["steps"] or 0), "status": r.get("status") or "done",
                         "run_s": float(r["run_s"]) if r.get("run_s") else "",
                         "unigram_entropy": float(r["unigram_entropy"]) if r.get("unigram_entropy") else "",
                         "bigram_xent": float(r["bigram_xent"]) if r.get("bigram_xent") else ""})
    return rows


# ---------------------------------------------------------------------------------------------
# CLI


def check_widths(widths: list[str], rest: list[str]) -> int:
    if not widths:
        print("error: the width list is empty: give the base width and at least one target width", file=sys.stderr)
        return 2
    for width in widths:
        try:
            cfg = parse_args(["--width", width, *rest])
            validate(resolve_defaults(cfg, "cuda" if torch.cuda.is_available() else "cpu", env={}))
        except (ConfigError, SystemExit) as e:
            print(f"error: width {width!r}: {e}", file=sys.stderr)
            return 2
    return 0


def main_collect(sweep_dir: Path, base_width: int | None, use_wandb: str = "auto",
                 widths: list[int] | None = None) -> int:
    """Read the runs (or the folder's sweep.csv when it has no run folders), write sweep.csv, verdict.json,
    verdict.md (the README's tables), transfer.png, drift.png and head_to_head.png next to it, print the verdict
    and the compute it cost. With `widths`, judge those widths only (base: the smallest) and print the verdict
    without writing a file: a second look at a sweep, e.g. without its narrowest width."""
    if not sweep_dir.is_dir():
        print(f"error: {sweep_dir} is not a folder of sweep runs", file=sys.stderr)
        return 2
    runs_dir = sweep_dir / "runs" if (sweep_dir / "runs").is_dir() else sweep_dir
    rows = collect(runs_dir)
    csv_path = sweep_dir / "sweep.csv"
    if not rows and csv_path.exists():
        rows = read_csv(csv_path)
    elif rows:
        write_csv(rows, csv_path)
    if not rows:
        print(f"error: no finished runs (config.json + a val_loss step line) under {runs_dir}", file=sys.stderr)
        return 1
    if base_width is None and (runs_dir / PLAN_FILE).exists():
        base_width = json.loads((runs_dir / PLAN_FILE).read_text()).get("base_width")
    if widths:
        rows = [r for r in rows if r["width"] in widths]
        if not rows:
            print(f"error: no finished runs at widths {widths} under {runs_dir}", file=sys.stderr)
            return 1
        result = transfer.verdicts(rows, min(widths))
        print(f"widths {sorted(widths)} only (nothing written):\n{transfer_report.report(result)}")
        return 0
    result = transfer.verdicts(rows, base_width)
    (sweep_dir / "verdict.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    figures = [transfer_report.plot_curves(rows, result, sweep_dir / "transfer.png"),
               transfer_report.plot_drift(result, sweep_dir / "drift.png"),
               transfer_report.plot_head_to_head(result, sweep_dir / "head_to_head.png")]
    figures = [f for f in figures if f is not None]
    (sweep_dir / "verdict.md").write_text(transfer_report.markdown(result))
    print(transfer_report.report(result))
    print(compute_summary(rows))
    print(f"csv: {csv_path}\nverdict: {sweep_dir / 'verdict.json'}, {sweep_dir / 'verdict.md'}\n"
          f"figures: {', '.join(map(str, figures))}")
    if use_wandb != "false":
        transfer_report.log_to_wandb(sweep_dir, result, figures, required=use_wandb == "true")
    return 0


def compute_summary(rows: list[dict]) -> str:
    """What the sweep cost: runs and summed wall hours per key and in all (each run's own wall time)."""
    per_key: dict[str, list[float]] = {}
    for r in rows:
        if r.get("run_s") != "" and r.get("run_s") is not None:
            per_key.setdefault(f"{r['parametrisation']}/{r['swept']}", []).append(float(r["run_s"]))
    timed = [t for ts in per_key.values() for t in ts]
    if not timed:
        return "compute: no run reports its wall time"
    lines = [f"compute: {len(rows)} runs; {len(timed)} timed, {sum(timed) / 3600:.2f} h summed over their wall "
             f"times (runs in parallel overlap: divide by SWEEP_JOBS for the elapsed time)"]
    for key in sorted(per_key, key=transfer._reading_order):
        lines.append(f"  {key:<40} {len(per_key[key]):>4} runs {sum(per_key[key]) / 3600:>7.2f} h")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m core.sweep")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a width x LR sweep (resumable)")
    r.add_argument("sweep_dir")
    r.add_argument("--base-width", type=int, required=True)
    r.add_argument("--widths", type=int, nargs="+", required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[1337])
    r.add_argument("--mistake-seeds", type=int, nargs="*", default=None, help="seeds of the mistake:* runs")
    r.add_argument("--params", nargs="+", default=["mup", "sp"])
    r.add_argument("--swept", nargs="+", default=["adam", "muon"])
    r.add_argument("--lr-mults", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4])
    r.add_argument("--jobs", type=int, default=int(os.environ.get("SWEEP_JOBS", "1")))
    r.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    r.add_argument("--retry-failed", action="store_true")
    r.add_argument("--launcher", default="auto", choices=launch.LAUNCHERS,
                   help="fork: each run a fork of this process (CPU, --nproc 1; saves ~3 s of imports a run); "
                        "exec: a fresh process per run; auto: fork where it can (core/launch.py)")
    r.add_argument("--wandb-project", default="speedrun-mup-group")
    r.add_argument("--no-collect", action="store_true", help="skip `collect` at the end")
    c = sub.add_parser("collect", help="sweep.csv, verdict.json and figures from a sweep folder (or its CSV)")
    c.add_argument("sweep_dir")
    c.add_argument("--base-width", type=int, default=None)
    c.add_argument("--use-wandb", default="auto", choices=["auto", "true", "false"],
                   help="log the figure, eta* table and verdict to a W&B summary run of the sweep's group")
    c.add_argument("--widths", type=int, nargs="+", default=None,
                   help="judge these widths only and print the verdict, writing nothing (e.g. leave out the base)")
    l = sub.add_parser("lr")
    l.add_argument("which", choices=sorted(DEFAULT_LR))
    l.add_argument("mult", type=float)
    w = sub.add_parser("check-widths")
    w.add_argument("widths", nargs="*")
    a, rest = p.parse_known_args(argv)
    if a.cmd == "lr":
        print(f"{DEFAULT_LR[a.which] * a.mult:.6g}")
        return 0
    if a.cmd == "check-widths":
        return check_widths(a.widths, rest + train_args)
    if rest:
        p.error(f"unrecognised arguments {rest} (train.py flags go after --)")
    if a.cmd == "run":
        if a.jobs < 1 or a.nproc < 1:
            print("error: SWEEP_JOBS / --jobs and --nproc must be >= 1", file=sys.stderr)
            return 2
        try:
            plan = make_plan(widths=a.widths, seeds=a.seeds, params=a.params, swept=a.swept, lr_mults=a.lr_mults,
                             mistake_seeds=a.mistake_seeds)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if check_widths([str(w) for w in a.widths], train_args):
            return 2
        try:
            launcher = launch.resolve_launcher(a.launcher, a.nproc, torch.cuda.is_available())
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        counts = run_sweep(Path(a.sweep_dir), plan, a.base_width, train_args, jobs=a.jobs, nproc=a.nproc,
                           retry_failed=a.retry_failed, wandb_project=a.wandb_project, launcher=launcher)
        print(f"sweep: {counts['done']} finished, {counts['failed']} failed, {counts['stopped']} stopped, "
              f"{counts['skipped']} skipped (done before or failed before)")
        if counts["stopped"]:
            return 3
        if a.no_collect:
            return 0
    if a.cmd == "collect":
        return main_collect(Path(a.sweep_dir), a.base_width, use_wandb=a.use_wandb, widths=a.widths)
    return main_collect(Path(a.sweep_dir), a.base_width, use_wandb="false")


if __name__ == "__main__":
    sys.exit(main())
