"""Reliability of whole runs (issue 6): SIGKILL + `--resume auto` is bitwise identical to an uninterrupted
run (standard and muP), a kill in the middle of a checkpoint write keeps the previous checkpoint, SIGTERM
stops cleanly with a checkpoint (a second signal exits at once), and both `--nan-policy` values do what
core/guard.py documents; plus unit tests of the guard (spikes, the device-side skip gate, no host syncs).

Runs use a tiny model on the embedded corpus and one thread per process (bitwise comparisons need the
same thread count everywhere; two single-thread processes also share the 2-core CI machine well).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from core import checkpoint as ck
from core.guard import (EXIT_NONFINITE, EXIT_STOPPED, INJECT_ENV, GracefulStop, NonFiniteError, NonFiniteGuard,
                        decode_groups)
from core.optimizers import DistAdam, Muon
from train import main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--width", "32", "--depth", "2", "--head-dim", "16", "--seq-len", "128", "--batch-tokens", "128",
        "--val-seq-len", "128", "--val-tokens", "256", "--log-every", "1", "--val-every", "5", "--use-wandb", "false",
        "--run-name", "r"]
TIMED = ("Time/", "Perf/", "Hardware/")  # wall-clock metrics: the only ones allowed to differ between runs


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def start(args, **env) -> subprocess.Popen:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def watch(proc: subprocess.Popen, lines: list, when, sig) -> threading.Thread:
    """Collect the process's output lines; send `sig` once a line satisfies `when`."""
    def loop():
        sent = False
        for line in proc.stdout:
            lines.append(line)
            if not sent and when(line):
                proc.send_signal(sig)
                sent = True
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def untimed(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in rs]


def train_losses(rs: list[dict]) -> dict[int, float]:
    return {r["step"]: r["Loss/train_loss"] for r in rs if "Loss/train_loss" in r}


def tensors_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# SIGKILL + resume


@pytest.mark.parametrize("variant", [[], ["--mup", "--base-width", "16", "--spectral-every", "4"]], ids=["sp", "mup"])
def test_sigkill_after_step_12_then_resume_auto_is_bitwise_identical(tmp_path, one_thread, variant):
    args = TINY + variant + ["--iterations", "20", "--save-every", "4", "--keep-last", "0"]
    killed_dir = tmp_path / "killed"
    proc = start(args + ["--log-dir", str(killed_dir)])
    lines: list[str] = []
    watcher = watch(proc, lines, lambda line: line.startswith("checkpoint:") and "(step 12," in line, signal.SIGKILL)
    # the uninterrupted reference runs in this process meanwhile (the machine has two cores)
    assert main(args + ["--log-dir", str(tmp_path / "ref")]) == 0
    assert proc.wait(timeout=300) == -signal.SIGKILL, "".join(lines[-20:])
    watcher.join()
    run_dir = killed_dir / "r"
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [4, 8, 12]

    assert main(args + ["--log-dir", str(killed_dir), "--resume", "auto"]) == 0

    ref_rows, resumed_rows = rows(tmp_path / "ref" / "r"), rows(run_dir)
    ref_losses, resumed_losses = train_losses(ref_rows), train_losses(resumed_rows)
    assert sorted(resumed_losses) == list(range(1, 21))
    assert resumed_losses == ref_losses  # bitwise: JSON keeps every bit of a float
    # every other logged number too (val loss, grad/param norms, LR, momentum, spectral norms with --mup)
    assert untimed(resumed_rows) == untimed(ref_rows)
    ref_final = ck.load_checkpoint(ck.checkpoint_path(tmp_path / "ref" / "r", 20))
    resumed_final = ck.load_checkpoint(ck.checkpoint_path(run_dir, 20))
    for key in ("model", "optimizers", "loader"):
        assert tensors_equal(ref_final[key], resumed_final[key]), key
    log = (run_dir / "training.log").read_text()
    assert "resume: " in log and "continuing after step 12" in log


def test_kill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path, one_thread):
    args = TINY + ["--iterations", "8", "--save-every", "2", "--keep-last", "0", "--log-dir", str(tmp_path)]
    proc = start(args, **{ck.TEST_KILL_ENV: "4"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    run_dir = tmp_path / "r"
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [2]  # step 4's file never got its final name
    partial = [p for p in ck.checkpoint_dir(run_dir).iterdir() if p.name.startswith(".tmp-")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(partial[0])  # the half-written file is refused
    assert ck.load_checkpoint(ck.checkpoint_path(run_dir, 2))["step"] == 2
    first_attempt = train_losses(rows(run_dir))
    assert sorted(first_attempt) == [1, 2, 3, 4]

    assert main(args + ["--resume", "auto"]) == 0
    resumed = train_losses(rows(run_dir))
    assert sorted(resumed) == list(range(1, 9))
    assert all(resumed[s] == first_attempt[s] for s in (1, 2, 3, 4))  # steps 3-4 recomputed identically
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [2, 4, 6, 8]
    assert not [p for p in ck.checkpoint_dir(run_dir).iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_bitwise_on_two_and_on_one_process(tmp_path):
    """torchrun, 2 gloo ranks: the checkpoint (optimizer state gathered from both ranks) resumes on 2 ranks
    bitwise, and on 1 process (same global batch) to the same result up to float rounding."""
    args = TINY + ["--batch-tokens", "256", "--iterations", "8", "--save-every", "4", "--keep-last", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(nproc, log_dir, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *args, "--log-dir", str(log_dir), *extra]
        if nproc == 1:
            cmd = [sys.executable, "train.py", *args, "--log-dir", str(log_dir), *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    torchrun(2, tmp_path / "ref")
    ref_dir = tmp_path / "ref" / "r"
    for name in ("two", "one"):  # as if killed right after step 4's checkpoint
        shutil.copytree(ref_dir, tmp_path / name / "r")
        ck.checkpoint_path(tmp_path / name / "r", 8).unlink()
    torchrun(2, tmp_path / "two", "--resume", "auto")
    torchrun(1, tmp_path / "one", "--resume", "auto")
    ref = ck.load_checkpoint(ck.checkpoint_path(ref_dir, 8))
    two = ck.load_checkpoint(ck.checkpoint_path(tmp_path / "two" / "r", 8))
    one = ck.load_checkpoint(ck.checkpoint_path(tmp_path / "one" / "r", 8))
    assert ref["world_size"] == 2 and two["world_size"] == 2 and one["world_size"] == 1
    for key in ("model", "loader"):
        assert tensors_equal(ref[key], two[key]), key
    for o in ("adam", "muon"):
        assert tensors_equal(ref["optimizers"][o]["state"], two["optimizers"][o]["state"]), o
    assert untimed(rows(tmp_path / "two" / "r")) == untimed(rows(ref_dir))
    for k, v in ref["model"].items():
        torch.testing.assert_close(one["model"][k], v, rtol=1e-4, atol=1e-5)
    assert "world size 2 -> 1" in (tmp_path / "one" / "r" / "training.log").read_text()


# ---------------------------------------------------------------------------------------------
# signals


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_3(tmp_path):
    args = TINY + ["--iterations", "60", "--log-dir", str(tmp_path)]  # no --save-every: the stop alone saves
    proc = start(args)
    lines: list[str] = []
    watcher = watch(proc, lines, lambda line: line.startswith("step:3/60 train_loss"), signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_STOPPED, "".join(lines[-20:])
    watcher.join()
    out = "".join(lines)
    assert "Traceback" not in out
    stop_line = next(line for line in lines if line.startswith("stopped: stopped by SIGTERM after step "))
    step = int(stop_line.split("after step ")[1].split(";")[0])
    assert 3 <= step < 60
    run_dir = tmp_path / "r"
    assert [s for s, _ in ck.list_checkpoints(run_dir)] == [step]
    saved = ck.load_checkpoint(ck.checkpoint_path(run_dir, step))
    assert saved["step"] == step and ck.first_non_finite(saved["model"]) is None
    # a complete log: a train row for every finished step, the stop in training.log, the summary written
    assert sorted(train_losses(rows(run_dir))) == list(range(1, step + 1))
    assert f"stopped by SIGTERM after step {step}" in (run_dir / "training.log").read_text().splitlines()[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_at_step"] == step and summary["stop_signal"] == "SIGTERM"


def test_a_second_signal_exits_at_once():
    code = ("from core.guard import GracefulStop; import time; s = GracefulStop().install(); "
            "print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr.readline() == "\n" and "SIGTERM: finishing the current step" in proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert "SIGTERM again: exiting now" in proc.stderr.read()


def test_graceful_stop_records_the_signal_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        assert stop.agreed(torch.device("cpu"), distributed=False) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------
# non-finite values through the whole trainer


@pytest.mark.parametrize("log_every,inject,group,bad_step,kept", [
    ("3", "5:embed", "embed", 5, [2, 4]),   # found at the next log step (6)
    ("100", "3:hidden", "hidden", 3, [2]),  # no log step before the save at 4: found by the save's own check
])
def test_nan_policy_abort_names_step_and_group_and_never_saves_a_nan(tmp_path, one_thread, monkeypatch, capsys,
                                                                     log_every, inject, group, bad_step, kept):
    monkeypatch.setenv(INJECT_ENV, inject)
    args = TINY + ["--iterations", "10", "--save-every", "2", "--keep-last", "0", "--log-dir", str(tmp_path),
                   "--log-every", log_every]
    assert main(args) == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert f"non-finite value at step {bad_step} in {group}" in err
    last = ck.checkpoint_path(tmp_path / "r", kept[-1])
    assert f"Last good checkpoint: {last}" in err
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "r")] == kept
    for _, path in ck.list_checkpoints(tmp_path / "r"):
        saved = ck.load_checkpoint(path)
        assert ck.first_non_finite({"model": saved["model"], "optimizers": saved["optimizers"]}) is None
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["nonfinite_step"] == bad_step and summary["last_good_checkpoint"] == str(last)


def test_nan_policy_skip_leaves_the_weights_untouched_and_stops_after_k_consecutive(tmp_path, one_thread,
                                                                                    monkeypatch, capsys):
    monkeypatch.setenv(INJECT_ENV, "2,4,5:lm_head")
    args = TINY + ["--iterations", "12", "--save-every", "1", "--keep-last", "0", "--log-dir", str(tmp_path),
                   "--nan-policy", "skip", "--max-nan-skips", "2"]
    assert main(args) == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "2 consecutive steps had non-finite values (--max-nan-skips 2)" in err
    assert "first non-finite value of the run was at step 2 in lm_head" in err
    run_dir = tmp_path / "r"
    saved = {s: ck.load_checkpoint(p) for s, p in ck.list_checkpoints(run_dir)}
    assert sorted(saved) == list(range(1, 6))  # 5: written on the way out, from the gated (good) weights
    assert f"Last good checkpoint: {ck.checkpoint_path(run_dir, 5)}" in err

    def same(a, b):  # weights and optimizer state (not the param groups: the schedule moves on)
        return tensors_equal(saved[a]["model"], saved[b]["model"]) and all(
            tensors_equal(saved[a]["optimizers"][o]["state"], saved[b]["optimizers"][o]["state"])
            for o in ("adam", "muon"))
    assert same(1, 2), "the skipped step 2 changed the weights or the optimizer state"
    assert same(3, 4) and same(4, 5)
    assert not tensors_equal(saved[2]["model"], saved[3]["model"])  # training went on after the skip
    for s in saved:
        assert ck.first_non_finite({"m": saved[s]["model"], "o": saved[s]["optimizers"]}) is None
    skipped = {r["step"]: r["Guard/skipped_steps"] for r in rows(run_dir) if "Guard/skipped_steps" in r}
    assert [skipped[s] for s in (1, 2, 3, 4)] == [0, 1, 1, 2]
    assert "non-finite value: skipped 1 step(s) up to step 2" in (run_dir / "training.log").read_text()


# ---------------------------------------------------------------------------------------------
# NonFiniteGuard units


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(10, 4, generator=g))
        self.hidden = nn.Parameter(torch.randn(4, 4, generator=g))
        self.head = nn.Parameter(torch.randn(10, 4, generator=g))
        self.scale = nn.Parameter(torch.ones(()))

    KINDS = {"embed": "embed", "hidden": "hidden", "head": "lm_head", "scale": "scalar"}

    def loss(self, x):
        h = self.embed[x] @ self.hidden * self.scale
        return nn.functional.cross_entropy(h @ self.head.T, x)


def toy_setup(policy="skip", **kw):
    model = Toy()
    adam = DistAdam([model.embed, model.head, model.scale], lr=0.01)
    muon = Muon([model.hidden], lr=0.02)
    guard = NonFiniteGuard(model, Toy.KINDS, [adam, muon], policy=policy, **kw)
    return model, adam, muon, guard


class HostSyncCounter:
    """Counts Python-level reads of a tensor to the host (each one is a sync on CUDA)."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            original = getattr(torch.Tensor, name)

            def wrapper(t, *a, _orig=original, **k):
                self.n += 1
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapper)


def toy_step(model, adam, muon, guard, step, poison=None):
    x = torch.arange(10) % 7
    loss = model.loss(x)
    loss.backward()
    if poison is not None:
        getattr(model, poison).grad.view(-1)[0] = float("inf")
    bad = guard.check(step, loss)
    guard.snapshot()
    adam.step()
    muon.step()
    guard.restore(bad)
    model.zero_grad(set_to_none=True)
    return loss


def test_skip_gate_restores_everything_without_host_syncs(monkeypatch):
    model, adam, muon, guard = toy_setup("skip")
    counter = HostSyncCounter(monkeypatch)
    toy_step(model, adam, muon, guard, 1, poison="head")  # first step: state is created inside the step
    assert counter.n == 0, "the per-step guard must not read anything back to the host"
    assert torch.equal(model.embed, Toy().embed) and torch.equal(model.hidden, Toy().hidden)
    assert all(torch.count_nonzero(t) == 0 for st in list(adam.state.values()) + list(muon.state.values())
               for t in st.values() if isinstance(t, torch.Tensor))
    monkeypatch.undo()
    toy_step(model, adam, muon, guard, 2)
    snap = ({n: p.detach().clone() for n, p in model.named_parameters()},
            [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for st in adam.state.values()])
    values = guard.read()
    report = guard.report(values, 2)  # corrects DistAdam's step counter for the skipped step
    assert report.metrics["Guard/skipped_steps"] == 1.0 and all(st["step"] == 1 for st in adam.state.values())
    toy_step(model, adam, muon, guard, 3, poison="hidden")
    assert all(torch.equal(p, snap[0][n]) for n, p in model.named_parameters())
    assert all(torch.equal(st["exp_avg"], old["exp_avg"]) for st, old in zip(adam.state.values(), snap[1]))
    v = guard.read()  # the device window holds step 3 (since the last read-back), the host the run's first
    assert decode_groups(int(v["guard/first_bad_mask"])) == ["hidden"] and v["guard/first_bad_step"] == 3
    assert (guard.first_bad_step, guard.first_bad_groups) == (1, ["lm_head"])


def test_skip_policy_stops_after_k_consecutive_and_abort_at_the_first():
    model, adam, muon, guard = toy_setup("skip", max_skips=2)
    for step in (1, 2):
        toy_step(model, adam, muon, guard, step, poison="embed")
    with pytest.raises(NonFiniteError, match="2 consecutive steps") as info:
        guard.report(guard.read(), 2)
    assert info.value.step == 1 and info.value.groups == ["embed"]
    model, adam, muon, guard = toy_setup("abort")
    toy_step(model, adam, muon, guard, 1)
    guard.report(guard.read(), 1)
    toy_step(model, adam, muon, guard, 2, poison="scale")
    with pytest.raises(NonFiniteError, match="non-finite value at step 2 in scalar"):
        guard.report(guard.read(), 2)


def test_nan_loss_is_flagged_as_the_loss_group():
    model, adam, muon, guard = toy_setup("abort")
    guard.check(4, torch.tensor(float("nan")))
    v = guard.read()
    assert v["guard/first_bad_step"] == 4 and decode_groups(int(v["guard/first_bad_mask"])) == ["loss"]


def test_loss_spikes_are_flagged_against_the_running_minimum():
    model, adam, muon, guard = toy_setup("skip", max_skips=100, spike_factor=10.0)
    for step, loss in enumerate([5.0, 4.0, 39.0, 2.0], start=1):
        guard.check(step, torch.tensor(loss))
    report = guard.report(guard.read(), 4)
    assert (report.metrics["Loss/spike"], report.metrics["Loss/spike_ratio"]) == (0.0, 0.0)  # 39 < 10 x 4
    guard.check(5, torch.tensor(float("nan")))  # not a spike, and not part of the running minimum
    for step, loss in enumerate([21.0, 30.0], start=6):
        guard.check(step, torch.tensor(loss))
    report = guard.report(guard.read(), 7)
    assert (report.metrics["Loss/spike"], report.metrics["Loss/spike_ratio"]) == (1.0, 15.0)
    spike_lines = [line for line in report.lines if line.startswith("loss spike")]
    assert len(spike_lines) == 1 and "2 step(s)" in spike_lines[0] and "largest at step 7" in spike_lines[0]
    assert guard.report(guard.read(), 8).metrics["Loss/spike"] == 0.0  # reset after each read-back


def test_guard_state_round_trips():
    _, _, _, guard = toy_setup("skip", spike_factor=10.0)
    guard.check(1, torch.tensor(3.0))
    guard.check(2, torch.tensor(float("inf")))
    guard.report(guard.read(), 2)  # the host learns the run's first non-finite step at a read-back
    state = guard.state_dict()
    _, _, _, fresh = toy_setup("skip", spike_factor=10.0)
    fresh.load_state_dict(state)
    assert fresh.read()["guard/run_min"] == 3.0 and (fresh.first_bad_step, fresh.first_bad_groups) == (2, ["loss"])
    assert fresh.state_dict() == state


def test_an_old_skipped_step_does_not_abort_a_resumed_run():
    """A checkpoint written after a skipped step, resumed with --nan-policy abort, trains on."""
    model, adam, muon, guard = toy_setup("skip")
    toy_step(model, adam, muon, guard, 1, poison="embed")
    guard.report(guard.read(), 1)
    model2, adam2, muon2, resumed = toy_setup("abort")
    resumed.load_state_dict(guard.state_dict())
    toy_step(model2, adam2, muon2, resumed, 2)
    assert resumed.report(resumed.read(), 2).lines == []
    assert (resumed.first_bad_step, resumed.skipped_total) == (1, 1)
