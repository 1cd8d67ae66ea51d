"""core/compile.py's --compile auto rule, and a toy-size smoke run of bench/step_bench.py (slow).

No timing is asserted here: benchmarks do not belong in unit tests (STYLE.md); the smoke test only
checks that the table prints its columns.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import compile as cc
from core.config import TrainConfig, resolve_defaults

ROOT = Path(__file__).resolve().parent.parent


def test_auto_compiles_on_cuda_and_explicit_flags_win():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cc.resolve_compile("auto", cuda, 0.0)[0] is True
    assert cc.resolve_compile("false", cuda, 100.0) == (False, "--compile false")
    assert cc.resolve_compile("true", cpu, 0.0)[0] is True


def test_auto_on_cpu_compiles_the_default_run_but_not_a_tiny_one(monkeypatch):
    monkeypatch.setattr(cc, "_has_cxx_compiler", lambda: True)
    cpu = torch.device("cpu")
    default = resolve_defaults(TrainConfig(), "cpu", env={})
    assert cc.run_train_tflop(default) > cc.CPU_COMPILE_MIN_TFLOP
    assert cc.resolve_compile("auto", cpu, cc.run_train_tflop(default))[0] is True
    tiny = resolve_defaults(TrainConfig(width=32, depth=2, head_dim=16, seq_len=128, batch_tokens=512, iterations=60),
                            "cpu", env={})
    compiled, why = cc.resolve_compile("auto", cpu, cc.run_train_tflop(tiny))
    assert not compiled and "--compile true" in why
    # the byte vocabulary: little element-wise readout work to fuse, measured not to pay back
    big_bytes = resolve_defaults(TrainConfig(width=512, depth=4, head_dim=32, seq_len=512, batch_tokens=4096,
                                             vocab_size=257), "cpu", env={})
    assert cc.run_train_tflop(big_bytes) > cc.CPU_COMPILE_MIN_TFLOP
    compiled, why = cc.resolve_compile("auto", cpu, cc.run_train_tflop(big_bytes), 257)
    assert not compiled and "vocabulary" in why


def test_auto_on_cpu_without_a_cxx_compiler_stays_eager_and_says_why(monkeypatch):
    monkeypatch.setattr(cc, "_has_cxx_compiler", lambda: False)
    compiled, why = cc.resolve_compile("auto", torch.device("cpu"), 100.0)
    assert not compiled and "g++" in why


@pytest.mark.slow
def test_step_bench_smoke():
    out = subprocess.run([sys.executable, "bench/step_bench.py", "--config", "bytes", "--widths", "32", "--modes",
                          "eager", "--steps", "1", "--warmup", "1", "--threads", "1", "--profile", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for needle in ("sgemm peak", "load average", "% of sgemm peak", "| 32 | eager |", "aten::mm"):
        assert needle in out.stdout, out.stdout
    shares = [float(line.split("%")[0]) for line in out.stdout.splitlines() if line.startswith("    ") and "%  " in line]
    assert len(shares) == 3 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.0
