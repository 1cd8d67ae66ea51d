"""Monitoring at the level of a whole training run (issue 4): what `train.py` sends to W&B, and what
the monitoring costs the training loop in host synchronisations and forward hooks.

* An offline W&B run of `train.py` (a subprocess, `--use-wandb true`, `WANDB_MODE=offline`, no API key)
  is read back from its `.wandb` file with `core.wandb_file.read_wandb_file`: its history holds the
  SPEC section 6 keys, its summary the best val loss / total steps / total time, its rows are exactly
  the rows of `metrics.jsonl`, and `Perf/mfu` is absent on CPU with a log line that says why.
* In-process runs of `core.trainer.run` count every `.item()`, `.tolist()`, `.cpu()` (and the other
  Python-level read-backs: `.numpy()`, `bool()`, `float()`, `int()`, `index()`) on tensors, step by
  step: exactly one per logging step (the monitor's single read-back), none on steps that do not log.
  Validation is accounted for separately: each validation (steps 0, val_every, ..., last) reads its
  mean loss back once (`evaluate(...).item()`), which the step line needs anyway; it happens at the top
  of the loop, outside the training step, so it is attributed to "validation", not to a step.
  Limitation: Python-level counting sees what the trainer's Python code asks for; a synchronising
  kernel inside a C++ op (e.g. boolean indexing on CUDA) would need `torch.cuda.set_sync_debug_mode`
  on a GPU.
* The same runs count forward hooks (per module, pre and post, plus the global ones) while every
  forward runs and after the run: none ever with activation statistics off; with them on, hooks exist
  only during the forward of activation steps and are gone afterwards.
* torch.compile: a compiled graph ignores forward hooks added after it was traced, so activation steps
  (and coordinate-check steps) must run the eager module (`TrainingMonitor.module_for`). A fast test
  replaces `torch.compile` with a wrapper and checks which module each step ran; a slow one compiles
  for real (CPU inductor, with a warm-up step, as on CUDA) and checks that the statistics arrive.

Expected step sets below are written out by hand from the documented schedule (core/monitor.py):
log steps are `step % log_every == 0`, the last step, and every spectral/activation step
(`step % spectral_every == 0`; activations follow the spectral interval).
"""
import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import core.trainer as trainer
from core.config import parse_args
from core.data import BatchLoader
from core.wandb_file import find_wandb_file, read_wandb_file

REPO = Path(__file__).resolve().parent.parent
TINY = ["--width", "32", "--depth", "2", "--head-dim", "16", "--seq-len", "128", "--batch-tokens", "128",
        "--val-seq-len", "128", "--val-tokens", "256", "--device", "cpu"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# An offline W&B run of train.py, read back from the .wandb file

WANDB_STEPS = 4  # log every 2, validate every 2, spectral norms and activations every 2


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("wandb_run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no API key, no settings
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", NETRC=str(tmp / "no_netrc"),
               WANDB_CONFIG_DIR=str(tmp / "wandb_config"), WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
               WANDB_DATA_DIR=str(tmp / "wandb_data"), MONITOR_SPECTRAL_EVERY="2", MONITOR_ACTIVATIONS="true",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = TINY + ["--iterations", str(WANDB_STEPS), "--log-every", "2", "--val-every", "2",
                   "--use-wandb", "true", "--log-dir", str(tmp / "logs"), "--run-name", "wb"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    run_dir = tmp / "logs" / "wb"
    return dict(run_dir=run_dir, output=proc.stdout, wandb=read_wandb_file(find_wandb_file(run_dir)),
                rows=read_rows(run_dir / "metrics.jsonl"))


def _public(row: dict) -> dict:
    """A history row without W&B's own `_step`, `_runtime`, `_timestamp`."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


# every key SPEC section 6 lists that a CPU run has (Perf/mfu and Hardware/reserved_memory_mb are CUDA only)
DOCUMENTED_KEYS = {
    "Time/training_time_ms", "Time/step_avg_ms", "Time/total_time_s",
    "Loss/train_loss", "Loss/val_loss", "Loss/train_perplexity", "Loss/val_perplexity", "Loss/best_val_loss",
    "Optimization/lr", "Optimization/grad_norm", "Optimization/momentum",
    "Model/param_norm", "Model/spectral_norm_max", "Model/spectral_norm_mean", "Model/spectral_norm_std",
    "Model/update_ratio_mean",
    "Perf/tokens_per_second", "Perf/flops_per_second", "Hardware/peak_memory_mb",
}


def test_wandb_history_holds_the_documented_keys(wandb_run):
    history = [_public(r) for r in wandb_run["wandb"]["history"]]
    keys = set().union(*history)
    assert DOCUMENTED_KEYS <= keys, f"missing from the W&B history: {sorted(DOCUMENTED_KEYS - keys)}"
    # per-matrix spectral norms and update ratios, for the same matrices
    spectral = {k.removeprefix("Model/spectral_norm/") for k in keys if k.startswith("Model/spectral_norm/")}
    ratios = {k.removeprefix("Model/update_ratio/") for k in keys if k.startswith("Model/update_ratio/")}
    assert spectral and spectral == ratios, (sorted(spectral), sorted(ratios))
    # activation statistics: all five for every measured layer
    layers = {k.removeprefix("Activations/").rsplit("_", 1)[0].removesuffix("_l2")
              for k in keys if k.startswith("Activations/")}
    assert layers, "no Activations/* key with MONITOR_ACTIVATIONS=true"
    for layer in layers:
        for stat in ("mean", "std", "max", "min", "l2_norm"):
            assert f"Activations/{layer}_{stat}" in keys, (layer, stat)
    # every train-log step has the whole cheap group (no gaps), spectral + activations on steps 2 and 4
    train_rows = {r["step"]: r for r in history if "Loss/train_loss" in r}
    assert sorted(train_rows) == [2, 4]
    cheap = {"Loss/train_loss", "Loss/train_perplexity", "Optimization/lr", "Optimization/grad_norm",
             "Optimization/momentum", "Model/param_norm", "Perf/tokens_per_second", "Perf/flops_per_second",
             "Time/step_avg_ms", "Hardware/peak_memory_mb", "Model/spectral_norm_max"}
    for step, row in train_rows.items():
        assert cheap <= set(row), (step, sorted(cheap - set(row)))
        assert any(k.startswith("Activations/") for k in row), step
        assert math.isclose(row["Loss/train_perplexity"], math.exp(row["Loss/train_loss"]), rel_tol=1e-9)
        assert row["Optimization/grad_norm"] > 0 and row["Model/param_norm"] > 0
        assert row["Model/spectral_norm_max"] >= row["Model/spectral_norm_mean"] > 0
        assert row["Hardware/peak_memory_mb"] > 0 and row["Perf/tokens_per_second"] > 0
    # validation on steps 0, 2, 4; best val loss is the running minimum
    val_rows = [r for r in history if "Loss/val_loss" in r]
    assert [r["step"] for r in val_rows] == [0, 2, 4]
    running = math.inf
    for r in val_rows:
        running = min(running, r["Loss/val_loss"])
        assert r["Loss/best_val_loss"] == running
        assert math.isclose(r["Loss/val_perplexity"], math.exp(r["Loss/val_loss"]), rel_tol=1e-9)


def test_wandb_summary_has_best_val_loss_total_steps_total_time(wandb_run):
    summary = wandb_run["wandb"]["summary"]
    vals = [r["Loss/val_loss"] for r in wandb_run["rows"] if "Loss/val_loss" in r]
    assert summary["best_val_loss"] == min(vals)
    assert summary["total_steps"] == WANDB_STEPS
    assert summary["total_time_s"] > 0
    assert wandb_run["wandb"]["exit_code"] == 0
    config = {k: v for k, v in wandb_run["wandb"]["config"].items() if k != "_wandb"}
    assert config == json.loads((wandb_run["run_dir"] / "config.json").read_text())
    assert config["spectral_every"] == 2 and config["activations"] is True  # the env vars reached the config


def test_metrics_jsonl_rows_equal_wandb_history_rows(wandb_run):
    history = [_public(r) for r in wandb_run["wandb"]["history"]]
    assert len(history) == len(wandb_run["rows"]) > 0
    for i, (w, j) in enumerate(zip(history, wandb_run["rows"])):
        assert w == j, f"row {i}: W&B {w} != metrics.jsonl {j}"


def test_mfu_absent_on_cpu_and_the_log_says_why(wandb_run):
    assert not any("Perf/mfu" in r for r in wandb_run["rows"])
    assert not any("Perf/mfu" in r for r in wandb_run["wandb"]["history"])
    console = (wandb_run["run_dir"] / "console.log").read_text()
    line = next((ln for ln in console.splitlines() if ln.startswith("MFU:")), None)
    assert line is not None and "unavailable" in line and "--peak-tflops" in line, line
    assert any(ln.startswith("W&B: run") and "(offline)" in ln for ln in console.splitlines()), console[-2000:]


# ---------------------------------------------------------------------------------------------
# In-process runs: host synchronisations and forward hooks, step by step

RUN_STEPS = 10
LOG_EVERY, VAL_EVERY, SPECTRAL_EVERY = 3, 5, 4
LOG_STEPS = {3, 4, 6, 8, 9, 10}   # % 3, spectral % 4, and the last step
QUIET_STEPS = {1, 2, 5, 7}        # everything else
ACTIVATION_STEPS = {4, 8}         # activations follow the spectral interval
VAL_STEPS = [0, 5, 10]

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class RunProbe:
    """Instruments one `core.trainer.run`: host read-backs and forward hooks, attributed to steps.

    A training step starts when the trainer asks the loader for its batches (`BatchLoader.next_step`,
    once per step); everything until the next one belongs to that step (its log, and after the last
    step the end of the run), except validation: `evaluate` and the `.item()` on its result.
    """

    def __init__(self, monkeypatch):
        self.step = 0                 # 0: before the first training step (setup)
        self.in_val = False
        self.val_result = None        # evaluate()'s result until its one read-back (a reference: no id reuse)
        self.syncs: dict[int, int] = {}
        self.val_syncs = 0
        self.sync_sites: dict[int, list[str]] = {}
        self.hooks_in_forward: dict[int, int] = {}
        self.step_module: dict[int, torch.nn.Module] = {}  # the module each training step ran
        self.hooks_in_val: list[int] = []
        self.hooks_after: int | None = None
        self.model = None
        probe = self

        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _orig=original, _name=name, **k):
                probe._count(t, _name)
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

        next_step = BatchLoader.next_step

        def counted_next_step(loader):
            probe.step += 1
            return next_step(loader)

        monkeypatch.setattr(BatchLoader, "next_step", counted_next_step)

        forward_backward = trainer.forward_backward

        def counted_forward_backward(model, *a, **k):
            probe.model = model
            probe.step_module[probe.step] = model
            probe.hooks_in_forward[probe.step] = count_forward_hooks(model)
            return forward_backward(model, *a, **k)

        monkeypatch.setattr(trainer, "forward_backward", counted_forward_backward)

        evaluate = trainer.evaluate

        def counted_evaluate(model, *a, **k):
            probe.hooks_in_val.append(count_forward_hooks(model))
            probe.in_val = True
            try:
                out = evaluate(model, *a, **k)
            finally:
                probe.in_val = False
            probe.val_result = out
            return out

        monkeypatch.setattr(trainer, "evaluate", counted_evaluate)

    def _count(self, t, name):
        if self.in_val or t is self.val_result:
            self.val_syncs += 1
            if t is self.val_result:
                self.val_result = None
            return
        self.syncs[self.step] = self.syncs.get(self.step, 0) + 1
        frame = traceback.extract_stack(limit=3)[0]  # the caller of the tensor method
        self.sync_sites.setdefault(self.step, []).append(f"{name} at {Path(frame.filename).name}:{frame.lineno}")


def count_forward_hooks(model: torch.nn.Module) -> int:
    from torch.nn.modules import module as nn_module
    local = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return local + len(nn_module._global_forward_hooks) + len(nn_module._global_forward_pre_hooks)


class StandInCompiled(torch.nn.Module):
    """What `torch.compile` returns in the fast test: a distinct module (forwarding to the model), so the
    test sees whether a step ran the compiled or the eager module without paying for compilation."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, *a, **k):
        return self.inner(*a, **k)


# activations on is run with the stand-in compile only: it covers the eager path too (activation steps run the
# eager model), and a third run would cost the time budget of this file
@pytest.fixture(scope="module", params=["off", "on_compiled"], ids=["activations_off", "activations_on_compiled"])
def probed_run(request, tmp_path_factory):
    activations = request.param != "off"
    compiled = request.param == "on_compiled"
    tmp = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only spin-waits on a loaded 2-core machine
    try:
        mp.chdir(tmp)  # a stray wandb/ folder would land here
        if compiled:
            mp.setattr(torch, "compile", lambda model, **kw: StandInCompiled(model))
        cfg = parse_args(TINY + ["--iterations", str(RUN_STEPS), "--log-every", str(LOG_EVERY),
                                 "--val-every", str(VAL_EVERY), "--spectral-every", str(SPECTRAL_EVERY),
                                 "--activations", str(activations).lower(), "--use-wandb", "false",
                                 "--compile", str(compiled).lower(),
                                 "--log-dir", str(tmp / "logs"), "--run-name", "r"])
        probe = RunProbe(mp)
        trainer.run(cfg)
        probe.hooks_after = count_forward_hooks(probe.model)
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return dict(probe=probe, activations=activations, compiled=compiled, tmp=tmp, run_dir=tmp / "logs" / "r",
                rows=read_rows(tmp / "logs" / "r" / "metrics.jsonl"))


def test_schedule_seen_by_the_probe_matches_the_logged_rows(probed_run):
    """The probe's step numbering is the trainer's: train-log rows on exactly the expected steps."""
    probe, rows = probed_run["probe"], probed_run["rows"]
    assert probe.step == RUN_STEPS
    assert sorted(r["step"] for r in rows if "Loss/train_loss" in r) == sorted(LOG_STEPS)
    assert [r["step"] for r in rows if "Loss/val_loss" in r] == VAL_STEPS
    act_steps = {r["step"] for r in rows if any(k.startswith("Activations/") for k in r)}
    assert act_steps == (ACTIVATION_STEPS if probed_run["activations"] else set())


def test_one_host_sync_per_logging_step_and_none_on_other_steps(probed_run):
    probe = probed_run["probe"]
    per_step = {s: probe.syncs.get(s, 0) for s in range(1, RUN_STEPS + 1)}
    where = {s: probe.sync_sites.get(s, []) for s in per_step if per_step[s]}
    for s in sorted(QUIET_STEPS):
        assert per_step[s] == 0, f"step {s} does not log but read {per_step[s]} value(s) back: {where[s]}"
    for s in sorted(LOG_STEPS):
        assert per_step[s] == 1, f"log step {s}: {per_step[s]} read-backs (expected the one collect): {where.get(s)}"
    # validation: one read-back of the mean loss per validation, nothing else
    assert probe.val_syncs == len(VAL_STEPS), probe.val_syncs


def test_forward_hooks_only_while_measuring_activations(probed_run):
    probe = probed_run["probe"]
    assert sorted(probe.hooks_in_forward) == list(range(1, RUN_STEPS + 1))
    measuring = ACTIVATION_STEPS if probed_run["activations"] else set()
    for step, n in sorted(probe.hooks_in_forward.items()):
        if step in measuring:
            assert n > 0, f"activation step {step}: no forward hook attached"
        else:
            assert n == 0, f"step {step}: {n} forward hook(s) registered while not measuring activations"
    assert probe.hooks_in_val == [0] * len(VAL_STEPS), probe.hooks_in_val
    assert probe.hooks_after == 0, f"{probe.hooks_after} forward hook(s) left on the model after the run"


def test_use_wandb_false_creates_no_wandb_files(probed_run):
    tmp = probed_run["tmp"]
    stray = [p for p in tmp.rglob("*") if p.name == "wandb" or p.suffix == ".wandb" or "wandb" in p.name]
    assert stray == [], stray
    console = (probed_run["run_dir"] / "console.log").read_text()
    assert "W&B" not in console, [ln for ln in console.splitlines() if "W&B" in ln]


def test_activation_steps_run_the_eager_module_when_compiled(probed_run):
    """A compiled graph would silently skip the hooks: activation steps must run the eager model."""
    modules = probed_run["probe"].step_module
    assert sorted(modules) == list(range(1, RUN_STEPS + 1))
    compiled = {s for s, m in modules.items() if isinstance(m, StandInCompiled)}
    if probed_run["compiled"]:
        assert compiled == set(modules) - ACTIVATION_STEPS, sorted(compiled)
    else:
        assert compiled == set()


@pytest.mark.slow
def test_real_compile_logs_activations_and_coordinate_check(tmp_path):
    """CPU inductor, with a kernel warm-up step first (as on CUDA): the hooks of activation steps and of
    the coordinate check must still fire. Before the trainer ran hook steps eagerly, this run logged no
    Activations/* key and the coordinate check crashed ("stack expects a non-empty TensorList")."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MONITOR_ACTIVATIONS="true", MONITOR_SPECTRAL_EVERY="2")
    args = TINY + ["--iterations", "3", "--log-every", "1", "--val-every", "0", "--compile", "true",
                   "--warmup-steps", "1", "--coord-check", "--coord-check-steps", "2", "--use-wandb", "false",
                   "--log-dir", str(tmp_path), "--run-name", "c"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = read_rows(tmp_path / "c" / "metrics.jsonl")
    act = {r["step"]: sum(k.startswith("Activations/") for k in r) for r in rows if "Loss/train_loss" in r}
    assert act[2] > 0 and act[1] == act[3] == 0, act
    coord = [json.loads(ln) for ln in (tmp_path / "c" / "coord_check.jsonl").read_text().splitlines()]
    assert [r["step"] for r in coord] == [0, 1] and all(r["logits"] >= 0 and r["embed"] > 0 for r in coord)


@pytest.mark.slow
def test_overhead_benchmark_runs_and_describes_its_own_run(tmp_path, monkeypatch, capsys):
    """bench/monitor_overhead.py on a tiny config: every mode and group measured, and --describe reads the run."""
    from bench import monitor_overhead as bench
    for var in ("WANDB_MODE", "WANDB_SILENT"):
        monkeypatch.setenv(var, "offline" if var == "WANDB_MODE" else "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--width", "32", "--depth", "2", "--head-dim", "16", "--seq-len", "128",
                           "--batch-tokens", "128", "--rounds", "1", "--block", "10", "--warmup", "1",
                           "--threads", "1", "--json", str(tmp_path / "o.json"), "--keep-logs", str(tmp_path / "k")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads((tmp_path / "o.json").read_text())["summary"]
    assert {m: r["steps"] for m, r in out["modes"].items()} == {"off": 10, "default": 10, "research": 10}
    assert out["modes"]["research"]["spectral_steps"] == out["modes"]["research"]["activation_steps"] == 1
    assert out["modes"]["default"]["spectral_steps"] == 0  # its interval is 100
    for key in ("grad_norm", "param_norm", "readback", "wandb", "spectral", "activations"):
        assert out["groups"][key]["median_ms"] > 0, key
    assert out["spectral_cold_ms"] > 0 and len(out["projections"]) == 5
    assert out["modes"]["research"]["attributed_pct"] > out["modes"]["default"]["attributed_pct"] > 0
    capsys.readouterr()
    assert bench.main(["--describe", str(tmp_path / "k" / "run")]) == 0
    text = capsys.readouterr().out
    assert "| attn.qkv_w.q |" in text and "| mlp.c_fc.weight |" in text and "spectral steps" in text
