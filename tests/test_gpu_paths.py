"""The CUDA-facing paths of a run that can be checked without a GPU (issue 13), and their GPU-only twins.

CPU: the allocator config train.py sets before torch loads (torch's parsed setting read back), peak memory
per phase in the log, and the kernel warm-up whose state the run discards (`--warmup-steps 2` gives rows
bitwise equal to 0; with --coord-check it also runs the eager measuring step once).
GPU (`-m gpu`, skipped without CUDA): the training step makes no host synchronisation between log steps.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import memory

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--width", "32", "--depth", "2", "--head-dim", "16", "--seq-len", "128", "--batch-tokens", "256",
        "--val-seq-len", "128", "--val-tokens", "256", "--iterations", "4", "--log-every", "1", "--val-every", "2",
        "--spectral-every", "2", "--use-wandb", "false"]
TIMED = ("Time/", "Perf/", "Hardware/")  # wall-clock and memory metrics: the only ones allowed to differ


def test_allocator_config_default_and_the_users_own():
    env = {}
    memory.configure_cuda_allocator(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # the record's setting
    assert "expandable_segments:True" in memory.allocator_note(env)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # either spelling is the user's choice
        env = {name: "max_split_size_mb:512"}
        memory.configure_cuda_allocator(env)
        assert env == {name: "max_split_size_mb:512"}
        assert "yours, kept" in memory.allocator_note(env)


def test_train_py_sets_the_allocator_config_before_torch_loads():
    code = ("import os, sys; os.environ.pop('PYTORCH_CUDA_ALLOC_CONF', None); os.environ.pop('PYTORCH_ALLOC_CONF', None)\n"
            "import train; assert 'torch' not in sys.modules, 'train.py imported torch at import time'\n"
            "import core.memory as m; m.configure_cuda_allocator()\n"
            "assert 'torch' not in sys.modules and os.environ['PYTORCH_CUDA_ALLOC_CONF'] == 'expandable_segments:True'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


MAIN_PATH_ALLOCATOR = """
import importlib.abc, os, runpy, sys
os.environ.pop('PYTORCH_CUDA_ALLOC_CONF', None); os.environ.pop('PYTORCH_ALLOC_CONF', None)
seen = {}

class Spy(importlib.abc.MetaPathFinder):  # notes the variable when anything first imports torch
    def find_spec(self, name, path, target=None):
        if name == 'torch':
            seen.setdefault('torch', os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))
        return None

sys.meta_path.insert(0, Spy())
sys.argv = [sys.argv[1], '--help']
try:
    runpy.run_path(sys.argv[0], run_name='__main__')
except SystemExit as e:
    assert e.code in (0, None), e.code  # --help
import torch
print('AT_TORCH_IMPORT', repr(seen.get('torch')), 'EFFECTIVE', repr(torch._C._accelerator_getAllocatorSettings()))
"""


def test_train_py_main_path_sets_the_allocator_config_before_torch_loads():
    """Issue 21 item 6: `python train.py` (whose `__main__` block imports torch.distributed.elastic) sets the
    record's allocator config before torch is first imported, and torch's parsed setting is that one."""
    proc = subprocess.run([sys.executable, "-c", MAIN_PATH_ALLOCATOR, "train.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AT_TORCH_IMPORT 'expandable_segments:True' EFFECTIVE 'expandable_segments:True'" in proc.stdout, \
        proc.stdout[-500:]


def test_allocator_note_names_torchs_effective_setting():
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    cpu = memory.allocator_note(env, "cpu", effective="expandable_segments:True")
    assert cpu.startswith("CUDA allocator: does not apply on cpu") and "effective setting: 'expandable_segments:True'" in cpu
    cuda = memory.allocator_note(env, "cuda", effective="expandable_segments:True")
    assert "WARNING" not in cuda and "effective setting: 'expandable_segments:True'" in cuda
    late = memory.allocator_note(env, "cuda", effective="")  # the variable was set after torch loaded
    assert "WARNING" in late and "before the variable was set" in late
    assert isinstance(memory.torch_allocator_setting(), str)  # this torch can say


def test_phase_peaks_on_cpu():
    peaks = memory.PhasePeaks(torch.device("cpu"))
    peaks.switch("train")
    peaks.switch("val")
    peaks.switch("train")
    peaks.end()
    assert set(peaks.peaks_mib) == {"train", "val"} and all(v > 0 for v in peaks.peaks_mib.values())
    assert peaks.run_peak_mib == max(peaks.peaks_mib.values())
    assert peaks.summary().startswith("peak memory per phase")


def _run(tmp_path: Path, name: str, *extra: str) -> tuple[list[dict], str]:
    from train import main
    assert main([*TINY, "--log-dir", str(tmp_path), "--run-name", name, *extra]) == 0
    run = tmp_path / name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows, (run / "training.log").read_text()


def test_kernel_warmup_state_is_restored_bitwise(tmp_path):
    """Issue 13 item 6: the warm-up trains on real batches (model, both optimizers, loader), then puts all of it
    back, so the measured run is the run without warm-up: every logged value bitwise equal."""
    plain, _ = _run(tmp_path, "w0", "--warmup-steps", "0")
    warmed, log = _run(tmp_path, "w2", "--warmup-steps", "2")
    assert "kernel warm-up: 2 steps" in log and "state restored" in log
    untimed = lambda rs: [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in rs]  # noqa: E731
    assert len(plain) == len(warmed) and untimed(plain) == untimed(warmed)
    assert any("Model/spectral_norm_max" in r for r in plain)  # the comparison covers the weights, not only losses
    # and the phases' peak memory is in the log, warm-up included
    assert "peak memory per phase" in log and "warmup" in log.split("peak memory per phase")[-1]


def test_kernel_warmup_runs_the_eager_measuring_step_and_restores_it(tmp_path):
    """Issue 21 item 2: with --coord-check the warm-up also runs the eager module once (on CUDA its FlexAttention
    and FP8 kernels compile on first use), so no compile lands in the timed loop; its state is discarded too."""
    plain, _ = _run(tmp_path, "c0", "--coord-check", "--warmup-steps", "0")
    warmed, log = _run(tmp_path, "c1", "--coord-check", "--warmup-steps", "1")
    assert "kernel warm-up: 1 steps + 1 eager step" in log
    untimed = lambda rs: [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in rs]  # noqa: E731
    assert untimed(plain) == untimed(warmed) and any("CoordCheck/readout" in r for r in plain)


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
def test_training_step_makes_no_host_sync_between_log_steps(tmp_path):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call: the non-log steps of a
    compiled run (loader H2D copies, forward/backward, the guard, both optimizers) must make none."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import core.trainer as trainer
    from core.config import parse_args
    cfg = parse_args(["--device", "cuda", "--width", "256", "--depth", "2", "--head-dim", "128", "--seq-len", "1024",
                      "--batch-tokens", "2048", "--val-seq-len", "1024", "--val-tokens", "2048", "--iterations", "8",
                      "--log-every", "4", "--val-every", "0", "--spectral-every", "0", "--warmup-steps", "2",
                      "--use-wandb", "false", "--log-dir", str(tmp_path), "--run-name", "sync"])
    real_fb, calls = trainer.forward_backward, []

    def strict_forward_backward(model, batches, window, grad_accum, **kw):
        # From step 2 on (step 1 fills the guard's and the window's small device caches once), every step that is
        # not a log step runs under the strict mode, from its forward to the next step's loader call; the
        # warm-up's calls (compilation) and the log steps (their one read-back) do not.
        calls.append(1)
        step = len(calls) - cfg.warmup_steps  # completed-step number of this call
        strict = step > 1 and step % cfg.log_every != 0
        torch.cuda.set_sync_debug_mode("error" if strict else "default")
        return real_fb(model, batches, window, grad_accum, **kw)

    trainer.forward_backward = strict_forward_backward
    try:
        trainer.run(cfg)
    finally:
        trainer.forward_backward = real_fb
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == cfg.warmup_steps + cfg.iterations
