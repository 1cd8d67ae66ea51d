"""Monitoring overhead: step time with monitoring off, default and research monitoring, measured
interleaved on one model in one process, and the cost of each metric group. METRICS_ANALYSIS.md quotes
this benchmark's output.

    python bench/monitor_overhead.py                         # CPU default config (core/config.py)
    python bench/monitor_overhead.py --rounds 50 --block 2   # the same, spelled out (300 measured steps)
    python bench/monitor_overhead.py --threads 1             # a loaded 2-core machine: no thread spin-waiting
    python bench/monitor_overhead.py --width 64 --seq-len 256 --batch-tokens 256 --rounds 4
    python bench/monitor_overhead.py --json overhead.json    # every number, machine-readable
    python bench/monitor_overhead.py --describe logs/<run> [logs/<run2> ...]

`--describe` measures nothing: it prints the monitoring metrics of finished runs (train loss, grad and
param norms, update ratios and spectral norms per matrix kind, logit statistics) at their spectral
steps, which is what METRICS_ANALYSIS.md quotes as "what healthy looks like".

Modes (each with its own `TrainingMonitor`, so each keeps its own step counter and schedule):

  off        log_every = infinity, spectral norms off, activations off: the monitor calls are no-ops
             and nothing is logged; the training step as the trainer runs it between log points.
  default    cheap metrics and a log row every step (grad norm, param norm, one read-back, the step
             line, a metrics.jsonl row and an offline W&B row), spectral norms + update ratios every
             100 steps, activations off (MONITOR_SPECTRAL_EVERY=100, the trainer's default interval).
  research   the same logging every step, spectral norms + update ratios every 10 steps, activation
             statistics (forward hooks) every 10 steps (MONITOR_SPECTRAL_EVERY=10 MONITOR_ACTIVATIONS=true).

Interleaving: `--rounds` rounds; in each round every mode runs a block of `--block` consecutive steps,
the order of the modes rotating from round to round, all on the same model, optimizers and data
stream, so machine load and the model's state affect the three modes alike. The end-to-end overhead
of a mode is its mean step time over the off mode's, with a 95% interval from the per-round paired
block differences. Because that interval is wide on a shared machine, each metric group is also timed
directly around its own call (ms per call), which gives the attributed overhead (the cheap group's
mean time per log step, plus the spectral and activation groups' mean time per call divided by their
interval, over the off step time; exact even when the run is shorter than the interval) and the
projections for other intervals (from the per-call medians, which a loaded machine inflates less).

The step mirrors core/trainer.py (the building blocks of core/steps.py are called, not copied): data, forward +
backward (activation hooks on activation steps), grad norm, the non-finite guard, LR/momentum
schedules, spectral snapshot, DistAdam + Muon step, param norm / update ratios / spectral norms, and
on log steps the single read-back, the step line, metrics.jsonl and W&B. Eager model (no torch.compile),
W&B forced offline. On CUDA every phase is bracketed by a device synchronisation so that time lands
in the group that launched it (the same for all modes); the CPU numbers need none.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model  # noqa: E402

import torch  # noqa: E402

from core.config import TrainConfig, grad_accum_steps, resolve_defaults, validate  # noqa: E402
from core.data import BatchLoader, resolve_data  # noqa: E402
from core.distributed import pick_device  # noqa: E402
from core.fp8 import resolve_fp8_mode  # noqa: E402
from core.guard import NonFiniteGuard  # noqa: E402
from core.logger import SimpleLogger, format_step_line  # noqa: E402
from core.monitor import TrainingMonitor  # noqa: E402
from core.schedule import window_blocks  # noqa: E402
from core.spectral import SpectralNormTracker, matrix_slices  # noqa: E402
from core.steps import (activation_modules, build_model, build_optimizer_pair, forward_backward,  # noqa: E402
                          memory_metrics, set_schedules)

MODES = ("off", "default", "research")
MODE_SETTINGS = {  # log_every, spectral_every, activations
    "off": (10**9, 0, False),
    "default": (1, 100, False),
    "research": (1, 10, True),
}
# Intervals projected from the per-call costs (METRICS_ANALYSIS.md's recommendations); activations, when on,
# follow the spectral interval as in the trainer. (name, log_every, spectral_every, activations)
PROJECTIONS = (
    ("daily training (the trainer's defaults)", 10, 100, False),
    ("cheap group every step (the default mode)", 1, 100, False),
    ("research debugging (the research mode)", 1, 10, True),
    ("spectral norms every step, no activations", 1, 1, False),
    ("everything every step", 1, 1, True),
)
GROUPS = (  # key, label
    ("grad_norm", "grad norm (foreach, on device)"),
    ("param_norm", "param norm (foreach, on device)"),
    ("readback", "read-back: collect() (one .tolist()) + guard report"),
    ("step_line", "step line (console + console.log + training.log)"),
    ("metrics_row", "metrics dict + metrics.jsonl row"),
    ("wandb", "W&B offline run.log() call"),
    ("spectral", "spectral norms + update ratios (warm tracker)"),
    ("activations", "activation statistics (hook compute)"),
)
CHEAP = ("grad_norm", "param_norm", "readback", "step_line", "metrics_row", "wandb")


# ---------------------------------------------------------------------------------------------
# machine, timing helpers


def machine(device: torch.device) -> dict:
    cpu = cpu_model()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load1() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Accumulates wall time per named phase of the current step (synchronised on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t


class TimedMonitor(TrainingMonitor):
    """TrainingMonitor whose activation hooks also add their own run time to `hook_s`.

    Wraps `_make_hook` and `_make_observer` (the monitor's hook factories; the readout reports its output
    through an observer, core/model.py): the hooks run inside the forward, so timing them from outside
    would need a difference of two noisy forward times.
    """

    hook_s = 0.0

    def _timed(self, name, fn):
        if not hasattr(self, "hook_s_by_module"):
            self.hook_s_by_module: dict[str, list[float]] = {}

        def timed(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                dt = time.perf_counter() - t
                self.hook_s += dt
                self.hook_s_by_module.setdefault(name, []).append(dt)
        return timed

    def _make_hook(self, name):
        return self._timed(name, super()._make_hook(name))

    def _make_observer(self, name):
        return self._timed(name, super()._make_observer(name))


def percentile_ci(diffs: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (normal approximation) of paired differences."""
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return m, float("nan")
    return m, 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs))


# ---------------------------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(self, cfg: TrainConfig, device: torch.device, log_dir: Path, use_wandb: bool, total_steps: int):
        self.cfg, self.device = cfg, device
        self.total_steps = total_steps
        fp8_mode, _ = resolve_fp8_mode(cfg.fp8, device)
        data = resolve_data(cfg.data_dir)
        self.model = build_model(cfg, device, fp8_mode)
        self.adam, self.muon, _ = build_optimizer_pair(self.model, cfg)
        self.optimizers = [self.adam, self.muon]
        self.grad_accum = grad_accum_steps(cfg, 1)
        self.loader = BatchLoader(data.train_files, cfg.seq_len, self.grad_accum, device=device)
        kinds = self.model.param_kinds()
        self.hidden = {n: p for n, p in self.model.named_parameters() if kinds[n] == "hidden"}
        self.guard = NonFiniteGuard(self.model, kinds, self.optimizers, policy="abort", device=device)
        # one tracker for the two spectral modes: after its first (cold) call every call is warm, as in a run
        self.tracker = SpectralNormTracker()
        act_modules = activation_modules(self.model)
        self.n_act_modules = len(act_modules)
        self.monitors = {}
        for mode, (log_every, spectral_every, activations) in MODE_SETTINGS.items():
            self.monitors[mode] = TimedMonitor(self.model, self.hidden, log_every=log_every,
                                               spectral_every=spectral_every, activations=activations,
                                               activation_modules=act_modules, tracker=self.tracker)
        self.local_step = {m: 0 for m in MODES}
        self.global_step = 0
        with contextlib.redirect_stdout(io.StringIO()):  # the logger announces itself; keep the table clean
            self.logger = SimpleLogger(log_dir, cfg.to_dict(), use_wandb=use_wandb, wandb_project="speedrun-bench")
        # SimpleLogger keeps its W&B run private; wrap the run's log() to time W&B's share of log_metrics
        self.wandb_run = getattr(self.logger, "_wandb_run", None)
        self.wandb_s = 0.0
        if self.wandb_run is not None:
            original = self.wandb_run.log

            def timed_log(*a, **k):
                t = time.perf_counter()
                try:
                    return original(*a, **k)
                finally:
                    self.wandb_s += time.perf_counter() - t
            self.wandb_run.log = timed_log
        self.records: list[dict] = []  # one per measured step

    def cold_spectral_ms(self) -> float:
        """One cold tracker call on the current weights (the first call of a run), then the tracker is warm."""
        mats = {n: m.detach() for name, p in self.hidden.items() for n, m in matrix_slices(name, p)}
        sync(self.device)
        t = time.perf_counter()
        est = self.tracker.estimate(mats)
        est.norms.tolist()  # the values exist on the host, as after a log step's read-back
        sync(self.device)
        return 1000 * (time.perf_counter() - t)

    def step(self, mode: str, measured: bool, round_index: int) -> None:
        cfg, mon, clock = self.cfg, self.monitors[mode], Clock(self.device)
        self.local_step[mode] += 1
        done = self.local_step[mode]
        step = self.global_step
        self.global_step += 1
        spectral, activations = mon.measures_spectral(done), mon.measures_activations(done)
        log_step = mon.is_log_step(done)
        hook_before, wandb_before = mon.hook_s, self.wandb_s

        sync(self.device)
        t0 = time.perf_counter()
        with clock("data"):
            batches = self.loader.next_step()
        window = window_blocks(step, self.total_steps, cfg.window_max)
        with clock("forward_backward"):
            with mon.activation_hooks(done):
                loss_sum = forward_backward(mon.module_for(done, self.model), batches, window, self.grad_accum)
        with clock("grad_norm"):
            mon.after_backward(done)
        with clock("optimizer"):
            bad = self.guard.check(done, loss_sum / (self.grad_accum * cfg.seq_len))
            factor = set_schedules(cfg, self.optimizers, self.muon, min(step, self.total_steps - 1))
        with clock("snapshot"):
            mon.before_optimizer(done)
        with clock("optimizer"):
            self.guard.snapshot()
            for opt in self.optimizers:
                opt.step()
            self.guard.restore(bad)
        with clock("after_optimizer"):
            mon.after_optimizer(done)
        with clock("optimizer"):
            self.model.zero_grad(set_to_none=True)
        if log_step:
            with clock("readback"):
                metrics = mon.collect(done, extra={"Loss/train_loss": loss_sum / (self.grad_accum * cfg.seq_len),
                                                   **self.guard.device_values()})
                metrics.update(self.guard.report(metrics, done).metrics)
            elapsed_ms = 1000 * (time.perf_counter() - t0)
            with clock("step_line"), contextlib.redirect_stdout(io.StringIO()):
                self.logger.info(format_step_line(done, self.total_steps, train_loss=metrics["Loss/train_loss"],
                                                  train_time_ms=elapsed_ms, step_avg_ms=elapsed_ms))
            with clock("log_metrics"):
                metrics.update({"Loss/train_perplexity": math.exp(min(metrics["Loss/train_loss"], 50.0)),
                                "Time/training_time_ms": elapsed_ms, "Time/step_avg_ms": elapsed_ms,
                                "Optimization/lr": self.adam.param_groups[0]["initial_lr"] * factor,
                                "Optimization/momentum": self.muon.param_groups[0]["momentum"],
                                "Perf/tokens_per_second": cfg.batch_tokens / max(elapsed_ms / 1000, 1e-9),
                                **memory_metrics(self.device)})
                self.logger.log_metrics(metrics, step=self.global_step)
        sync(self.device)
        total = time.perf_counter() - t0
        if not measured:
            return
        ph = clock.phases
        wandb_s = self.wandb_s - wandb_before
        self.records.append(dict(
            mode=mode, round=round_index, local_step=done, step_ms=1000 * total, log=log_step, spectral=spectral,
            activations=activations, grad_norm=1000 * ph["grad_norm"] if log_step else 0.0,
            after_optimizer=1000 * ph["after_optimizer"], snapshot=1000 * ph["snapshot"],
            readback=1000 * ph.get("readback", 0.0), step_line=1000 * ph.get("step_line", 0.0),
            metrics_row=1000 * (ph.get("log_metrics", 0.0) - wandb_s), wandb=1000 * wandb_s,
            hooks=1000 * (mon.hook_s - hook_before), forward_backward=1000 * ph["forward_backward"]))


def summarise(records: list[dict], cold_ms: float, n_act_modules: int,
              hook_ms_by_module: dict[str, float] | None = None) -> dict:
    by_mode = {m: [r for r in records if r["mode"] == m] for m in MODES}
    off_mean = statistics.fmean(r["step_ms"] for r in by_mode["off"])
    out: dict = {"modes": {}, "groups": {}, "projections": [], "off_step_ms": off_mean}

    # end-to-end, with paired per-round block differences
    rounds = sorted({r["round"] for r in records})
    block_mean = {(m, k): statistics.fmean(r["step_ms"] for r in by_mode[m] if r["round"] == k)
                  for m in MODES for k in rounds}
    for m in MODES:
        steps = [r["step_ms"] for r in by_mode[m]]
        row = {"steps": len(steps), "mean_ms": statistics.fmean(steps), "median_ms": statistics.median(steps),
               "spectral_steps": sum(r["spectral"] for r in by_mode[m]),
               "activation_steps": sum(r["activations"] for r in by_mode[m]),
               "log_steps": sum(r["log"] for r in by_mode[m])}
        if m != "off":
            d, half = percentile_ci([block_mean[(m, k)] - block_mean[("off", k)] for k in rounds])
            row["end_to_end_pct"] = 100 * d / off_mean
            row["end_to_end_ci_pct"] = 100 * half / off_mean
        out["modes"][m] = row

    # per-group cost per call (median over the calls of both monitored modes: the same code runs)
    mon = [r for r in records if r["mode"] != "off"]
    plain_log = [r for r in mon if r["log"] and not r["spectral"]]
    param_norm = [r["after_optimizer"] for r in plain_log]
    param_med = statistics.median(param_norm) if param_norm else 0.0
    calls = {
        "grad_norm": [r["grad_norm"] for r in mon if r["log"]],
        "param_norm": param_norm,
        "readback": [r["readback"] for r in mon if r["log"]],
        "step_line": [r["step_line"] for r in mon if r["log"]],
        "metrics_row": [r["metrics_row"] for r in mon if r["log"]],
        "wandb": [r["wandb"] for r in mon if r["log"]],
        # after_optimizer of a spectral step also computes the param norm: subtract its median
        "spectral": [r["snapshot"] + r["after_optimizer"] - param_med for r in mon if r["spectral"]],
        "activations": [r["hooks"] for r in mon if r["activations"]],
    }
    for key, label in GROUPS:
        xs = calls[key]
        g = {"label": label, "calls": len(xs), "median_ms": statistics.median(xs) if xs else float("nan"),
             "mean_ms": statistics.fmean(xs) if xs else float("nan"),
             "calls_per_mode": {m: sum(1 for r in by_mode[m] if _group_called(key, r)) for m in MODES}}
        g["pct_of_off_step"] = 100 * g["median_ms"] / off_mean
        out["groups"][key] = g
    out["groups"]["activations"]["modules"] = n_act_modules
    out["groups"]["activations"]["median_ms_by_module"] = hook_ms_by_module or {}
    out["spectral_cold_ms"] = cold_ms

    # attributed overhead of each monitored mode: the mean time of its cheap group per log step, plus the
    # interval groups' mean time per call amortised over their nominal interval (so a run shorter than
    # the interval still counts them; the cold start, once per run, is reported apart)
    for m in ("default", "research"):
        log_every, spectral_every, acts = MODE_SETTINGS[m]
        logs = [r for r in by_mode[m] if r["log"]]
        cheap = sum(_group_time(key, r, param_med) for r in logs for key in CHEAP) / max(len(logs), 1)
        per_step = cheap / log_every
        if spectral_every:
            per_step += out["groups"]["spectral"]["mean_ms"] / spectral_every
            if acts:
                per_step += out["groups"]["activations"]["mean_ms"] / spectral_every
        out["modes"][m]["attributed_ms_per_step"] = per_step
        out["modes"][m]["attributed_pct"] = 100 * per_step / off_mean

    # projections for other intervals from the per-call medians
    cheap_ms = sum(out["groups"][k]["median_ms"] for k in CHEAP)
    out["cheap_group_ms_per_log_step"] = cheap_ms
    spec_ms, act_ms = out["groups"]["spectral"]["median_ms"], out["groups"]["activations"]["median_ms"]
    for name, log_every, spectral_every, acts in PROJECTIONS:
        ms = cheap_ms / log_every + (spec_ms / spectral_every if spectral_every else 0.0)
        if acts:
            ms += act_ms / (spectral_every or log_every)
        out["projections"].append({"name": name, "log_every": log_every, "spectral_every": spectral_every,
                                   "activations": acts, "ms_per_step": ms, "pct": 100 * ms / off_mean})
    out["spectral_amortised_default_ms"] = spec_ms / MODE_SETTINGS["default"][1]
    out["spectral_amortised_default_pct"] = 100 * out["spectral_amortised_default_ms"] / off_mean
    return out


def _group_called(key: str, r: dict) -> bool:
    if key == "spectral":
        return r["spectral"]
    if key == "activations":
        return r["activations"]
    if key == "param_norm":
        return r["log"] and not r["spectral"]
    return r["log"]


def _group_time(key: str, r: dict, param_med: float) -> float:
    """Milliseconds that group `key` took in step record `r` (0 where it did not run)."""
    if key == "param_norm":
        return 0.0 if not r["log"] else (param_med if r["spectral"] else r["after_optimizer"])
    if key == "spectral":
        return r["snapshot"] + r["after_optimizer"] - param_med if r["spectral"] else 0.0
    if key == "activations":
        return r["hooks"]
    return r[key]


def print_report(s: dict, info: dict, cfg: TrainConfig, a, loads: dict, wall_s: float) -> None:
    gpu = f" | GPU {info['gpu']}" if "gpu" in info else ""
    print(f"machine: {info['cpu']} | {info['cores']} cores, torch threads {info['torch_threads']} | "
          f"torch {info['torch']} | python {info['python']} | device {info['device']}{gpu}")
    print(f"config: depth {cfg.depth} width {cfg.width} head_dim {cfg.head_dim} seq_len {cfg.seq_len} "
          f"batch {cfg.batch_tokens} tokens/step | eager | W&B {'offline' if not a.no_wandb else 'off'}")
    print(f"schedule: {a.rounds} rounds x 3 modes x {a.block} steps, interleaved (mode order rotates each round) "
          f"after {a.warmup} warm-up step(s) per mode | {wall_s:.0f} s")
    print(f"load average (1 min): start {loads['start']:.2f}, end {loads['end']:.2f}, "
          f"min {loads['min']:.2f}, max {loads['max']:.2f} (sampled each round)")
    print()
    print("| mode | log_every | spectral_every | activations | steps (spectral/act.) | mean step (ms) | "
          "median step (ms) | end-to-end overhead (95% CI) | attributed overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in MODES:
        r = s["modes"][m]
        log_every, spectral_every, acts = MODE_SETTINGS[m]
        e2e = (f"{r['end_to_end_pct']:+.2f}% ± {r['end_to_end_ci_pct']:.2f}%" if m != "off" else "-")
        attr = f"{r['attributed_pct']:.2f}% ({r['attributed_ms_per_step']:.2f} ms/step)" if m != "off" else "-"
        print(f"| {m} | {'never' if log_every >= 10**9 else log_every} | {spectral_every or 'off'} | "
              f"{'every %d' % spectral_every if acts else 'off'} | {r['steps']} ({r['spectral_steps']}/"
              f"{r['activation_steps']}) | {r['mean_ms']:.1f} | {r['median_ms']:.1f} | {e2e} | {attr} |")
    print()
    off = s["off_step_ms"]
    print(f"per metric group, ms per call (median over default + research calls); % of the off step ({off:.1f} ms):")
    print("| group | calls (default/research) | median ms/call | mean ms/call | % of step per call |")
    print("|---|---|---|---|---|")
    for key, label in GROUPS:
        g = s["groups"][key]
        if key == "activations":
            label += f", {g['modules']} modules"
        cpm = g["calls_per_mode"]
        print(f"| {label} | {cpm['default']}/{cpm['research']} | {g['median_ms']:.3f} | {g['mean_ms']:.3f} | "
              f"{g['pct_of_off_step']:.3f}% |")
    print(f"| spectral norms, cold start (first call of a run, 30 iterations) | 1 | {s['spectral_cold_ms']:.3f} | "
          f"{s['spectral_cold_ms']:.3f} | {100 * s['spectral_cold_ms'] / off:.3f}% |")
    print(f"cheap group per log step (sum of the first {len(CHEAP)} rows): {s['cheap_group_ms_per_log_step']:.3f} ms "
          f"= {100 * s['cheap_group_ms_per_log_step'] / off:.3f}% of a step")
    by_module = s["groups"]["activations"]["median_ms_by_module"]
    if by_module:
        total = sum(by_module.values())
        top = sorted(by_module.items(), key=lambda kv: -kv[1])[:3]
        print("(activation hooks, median ms per call by module, largest first: " + ", ".join(
            f"{n} {ms:.3f} ({100 * ms / total:.0f}%)" for n, ms in top) + f"; all {len(by_module)}: {total:.3f})")
    print()
    print("projected overhead per step from the per-call medians (activations follow the spectral interval):")
    print("| configuration | log_every | MONITOR_SPECTRAL_EVERY | MONITOR_ACTIVATIONS | ms/step | % of step |")
    print("|---|---|---|---|---|---|")
    for p in s["projections"]:
        print(f"| {p['name']} | {p['log_every']} | {p['spectral_every']} | {str(p['activations']).lower()} | "
              f"{p['ms_per_step']:.3f} | {p['pct']:.3f}% |")
    print()
    d = s["modes"]["default"]
    median_pct = s["projections"][1]["pct"]  # the default mode's settings
    ok = d["attributed_pct"] <= 2.0 and median_pct <= 2.0
    print(f"target: default monitoring adds <= 2%: attributed {d['attributed_pct']:.2f}% (mean of the measured calls), "
          f"{median_pct:.2f}% (median per call), end-to-end {d['end_to_end_pct']:+.2f}% ± {d['end_to_end_ci_pct']:.2f}% "
          f"-> {'met' if ok else 'NOT met'} (judged on the attributed numbers; the end-to-end interval is the "
          f"cross-check)")
    print(f"amortised spectral cost at the default interval (100): {s['spectral_amortised_default_ms']:.3f} ms/step "
          f"= {s['spectral_amortised_default_pct']:.3f}% of the step")


# ---------------------------------------------------------------------------------------------
# --describe: the monitoring metrics of finished runs


def _kind(matrix: str) -> str:
    """`blocks.3.attn.qkv_w.q` -> `attn.qkv_w.q`: the same matrix in every block."""
    parts = matrix.split(".")
    return ".".join(parts[2:]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else matrix


def describe(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    spec = [r for r in rows if "Model/update_ratio_mean" in r]
    vals = [r for r in rows if "Loss/val_loss" in r]
    print(f"run {run_dir}: width {cfg.get('width')} depth {cfg.get('depth')} mup {cfg.get('mup')} "
          f"base_width {cfg.get('base_width')} | {len(rows)} rows, {len(spec)} spectral steps"
          + (f" | val_loss {vals[0]['Loss/val_loss']:.4f} (step {vals[0]['step']}) -> {vals[-1]['Loss/val_loss']:.4f} "
             f"(step {vals[-1]['step']})" if vals else ""))
    if not spec:
        print("  no spectral steps: run with MONITOR_SPECTRAL_EVERY=N (N <= the number of steps)")
        return
    print("| step | train_loss | grad_norm | param_norm | update ratio mean (min, max) | spectral norm max / mean "
          "(std) | residual max | logits std / max |")
    print("|---|---|---|---|---|---|---|---|")
    for r in spec:
        ratios = [v for k, v in r.items() if k.startswith("Model/update_ratio/")]
        logits = (f"{r['Activations/lm_head_std']:.3f} / {r['Activations/lm_head_max']:.2f}"
                  if "Activations/lm_head_std" in r else "-")
        print(f"| {r['step']} | {r.get('Loss/train_loss', float('nan')):.4f} | "
              f"{r.get('Optimization/grad_norm', float('nan')):.4f} | {r.get('Model/param_norm', float('nan')):.1f} | "
              f"{r['Model/update_ratio_mean']:.4f} ({min(ratios):.4f}, {max(ratios):.4f}) | "
              f"{r['Model/spectral_norm_max']:.3f} / {r['Model/spectral_norm_mean']:.3f} "
              f"({r['Model/spectral_norm_std']:.3f}) | {r.get('Model/spectral_residual_max', float('nan')):.1e} | "
              f"{logits} |")
    picks = [spec[0], spec[len(spec) // 2], spec[-1]] if len(spec) > 2 else spec
    kinds = sorted({_kind(k.removeprefix("Model/update_ratio/")) for k in spec[-1] if k.startswith("Model/update_ratio/")})
    print("per matrix kind (mean over blocks): update ratio ||dW||_F/||W||_F | spectral norm, at steps "
          + ", ".join(str(r["step"]) for r in picks))
    print("| matrix | " + " | ".join(f"ratio @{r['step']} | spectral @{r['step']}" for r in picks) + " |")
    print("|---|" + "---|---|" * len(picks))
    for kind in kinds:
        cells = []
        for r in picks:
            ur = [v for k, v in r.items() if k.startswith("Model/update_ratio/") and _kind(k[19:]) == kind]
            sn = [v for k, v in r.items() if k.startswith("Model/spectral_norm/") and _kind(k[20:]) == kind]
            cells.append(f"{statistics.fmean(ur):.4f} | {statistics.fmean(sn):.3f}" if ur and sn else "- | -")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50, help="rounds of interleaved blocks")
    p.add_argument("--block", type=int, default=2, help="consecutive steps of one mode per round (short blocks "
                   "pair the modes closely in time, so load changes cancel better)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per mode first")
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-wandb", action="store_true", help="log metrics.jsonl only (W&B group reads 0)")
    p.add_argument("--json", help="write every number (and the per-step records) to this file")
    p.add_argument("--keep-logs", help="keep the bench's log folder (with the offline W&B run) here")
    p.add_argument("--describe", nargs="+", metavar="RUN_DIR", help="print the monitoring metrics of finished "
                   "runs (logs/<run_name>) instead of benchmarking")
    a = p.parse_args(argv)
    if a.describe:
        for d in a.describe:
            if not (Path(d) / "metrics.jsonl").exists():
                p.error(f"{d}: no metrics.jsonl; pass a run folder logs/<run_name>")
        for d in a.describe:
            describe(Path(d))
        return 0
    if a.rounds < 1 or a.block < 1 or a.warmup < 0:
        p.error("--rounds and --block must be >= 1, --warmup >= 0")
    if a.rounds * a.block < MODE_SETTINGS["research"][1]:
        p.error(f"--rounds x --block = {a.rounds * a.block} steps per mode: the research mode measures spectral norms "
                f"and activations every {MODE_SETTINGS['research'][1]} steps, so give it at least that many")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    cfg = resolve_defaults(TrainConfig(width=a.width, depth=a.depth, head_dim=a.head_dim, seq_len=a.seq_len,
                                       batch_tokens=a.batch_tokens, spectral_every=0, activations=False),
                           device.type, env={})
    validate(cfg)
    os.environ["WANDB_MODE"] = "offline"  # a benchmark never uploads
    os.environ.setdefault("WANDB_SILENT", "true")

    total = (a.rounds * a.block + a.warmup) * len(MODES)
    log_root = Path(a.keep_logs) if a.keep_logs else Path(tempfile.mkdtemp(prefix="monitor_overhead_"))
    loads = {"start": load1()}
    samples = [loads["start"]]
    t_start = time.perf_counter()
    try:
        bench = Bench(cfg, device, log_root / "run", use_wandb=not a.no_wandb, total_steps=total)
        for mode in MODES:
            for _ in range(a.warmup):
                bench.step(mode, measured=False, round_index=-1)
        for m in MODES:  # measured steps count from 1 in every mode: the schedules start fresh
            bench.local_step[m] = 0
        # the tracker's first call is the cold one: time it here, so every call inside the rounds is warm
        cold_ms = bench.cold_spectral_ms()
        for k in range(a.rounds):
            order = MODES[k % 3:] + MODES[:k % 3]
            for mode in order:
                for _ in range(a.block):
                    bench.step(mode, measured=True, round_index=k)
            samples.append(load1())
            print(f"round {k + 1}/{a.rounds}: load {samples[-1]:.2f}", file=sys.stderr, flush=True)
        bench.logger.close()
    finally:
        if not a.keep_logs:
            shutil.rmtree(log_root, ignore_errors=True)
    wall_s = time.perf_counter() - t_start
    loads.update(end=load1(), min=min(samples), max=max(samples + [load1()]))
    if not a.no_wandb and bench.wandb_run is None:
        print("note: W&B did not start (is wandb installed?); the W&B row reads 0", file=sys.stderr)
    by_module = getattr(bench.monitors["research"], "hook_s_by_module", {})
    s = summarise(bench.records, cold_ms, bench.n_act_modules,
                  {n: 1000 * statistics.median(ts) for n, ts in by_module.items()})
    info = machine(device)
    print_report(s, info, cfg, a, loads, wall_s)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": info, "config": cfg.to_dict(), "args": vars(a),
                                            "load_average": loads, "summary": s, "records": bench.records},
                                           indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
