"""What `torch.compile` compiles, and when `--compile auto` turns it on (issue 10).

Owns `resolve_compile(cfg, device)`: the decision and the sentence the trainer logs with it.

- `--compile true|false`: as asked (false keeps every step eager).
- `--compile auto` on CUDA: on, as in the record.
- `--compile auto` on a CPU: on when compiling was measured to pay back over the run: a large vocabulary
  and enough training work. Inductor fuses the element-wise work around the readout (soft-cap, sigmoid,
  log-softmax and their backward over a T x 50304 tensor), which eager PyTorch runs as ~12 separate passes
  over memory: the GPT-2-vocabulary default step is 1.55x (4 x 256 tokens) to 2.3x (1 x 1024) faster compiled. With the byte vocabulary (257)
  there is little to fuse: 1.03x at width 256, for ~2 minutes of compiling, so byte runs (the muP lab's
  sweeps) stay eager. The compiler needs a C++ compiler on a CPU (inductor generates C++); without one,
  auto stays eager.

What is compiled: the model's forward+backward (one graph) and, on validation steps, the same module
without gradients (a second graph, compiled on the first validation). Muon's Newton-Schulz is compiled
on CUDA only (`core/optimizers.py`); FlexAttention on CUDA only (`core/attention.py`). Activation and
coordinate-check steps run the eager module (`core/monitor.py`), so their hooks fire.
"""
from __future__ import annotations

import shutil

import torch

# CPU auto rule: compile when the run's training work (FLOPs, core/mfu.py) is at least this much.
# Measured with bench/step_bench.py --threads 1 on the project's 2-core AVX2 EPYC, loaded by other jobs
# (load average 6-11, so every time is several times a quiet machine's; the ratios are what count):
# - 1 x 1024 tokens per step (the CPU default before issue 12): 12.6 s eager, 5.4 s compiled (46.8 GFLOP);
#   compiling ~12 s (training graph) + ~58 s (validation graph): break-even ~0.5 TFLOP of training;
# - 4 x 256 tokens per step (the CPU default now): 5.6 s eager, 3.6 s compiled (45.2 GFLOP); compiling
#   ~84 s + the validation graph: break-even ~3 TFLOP.
# The default run (150 steps, ~7 TFLOP) compiles; the tests' tiny runs (<= 0.3 TFLOP) stay eager.
CPU_COMPILE_MIN_TFLOP = 3.0
# ... and only with a vocabulary at least this large (measured: 50257 pays, 257 does not; the bound lies
# between them, where the readout's element-wise work starts to dominate the step).
CPU_COMPILE_MIN_VOCAB = 8192


def run_train_tflop(cfg) -> float:
    """Training work of the run in TFLOP: iterations x tokens/step x FLOPs per token at the mid-run window."""
    from core.mfu import flops_per_token
    from core.model import GPTConfig
    from core.schedule import window_blocks

    mc = GPTConfig(vocab_size=cfg.vocab_size or 50257, depth=cfg.depth, width=cfg.width, head_dim=cfg.head_dim)
    w = window_blocks(cfg.iterations // 2, cfg.iterations, cfg.window_max)
    fpt = flops_per_token(depth=cfg.depth, width=cfg.width, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size or 50257,
                          attn_layers=[mc.has_attention(i) for i in range(cfg.depth)],
                          window_tokens=[128 * (w if mc.uses_long_window(i) else max(1, w // 2))
                                         for i in range(cfg.depth)],
                          seq_len=cfg.seq_len, mlp_ratio=mc.mlp_ratio)
    return cfg.iterations * cfg.batch_tokens * fpt / 1e12


def _has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def resolve_compile(mode: str, device: torch.device, train_tflop: float | None,
                    vocab_size: int | None = None) -> tuple[bool, str]:
    """(compile?, why) for `--compile mode` on `device`; `train_tflop` is the run's training work in TFLOP,
    `vocab_size` the model's vocabulary (None: GPT-2's)."""
    if mode == "true":
        return True, "--compile true"
    if mode == "false":
        return False, "--compile false"
    if device.type == "cuda":
        return True, "auto: CUDA (the record compiles)"
    if not _has_cxx_compiler():
        return False, "auto: no C++ compiler found (inductor needs g++ on a CPU); install one or pass --compile true"
    vocab = 50257 if vocab_size is None else vocab_size
    if vocab < CPU_COMPILE_MIN_VOCAB:
        return False, (f"auto: CPU run with a {vocab}-token vocabulary (below {CPU_COMPILE_MIN_VOCAB}, compiling does not pay "
                       "back: core/compile.py); pass --compile true to compile anyway")
    if train_tflop is None or train_tflop < CPU_COMPILE_MIN_TFLOP:
        work = "unknown" if train_tflop is None else f"{train_tflop:.2f}"
        return False, (f"auto: CPU run of {work} TFLOP is below the {CPU_COMPILE_MIN_TFLOP:g} TFLOP where compiling "
                       "pays back (core/compile.py); pass --compile true to compile anyway")
    return True, f"auto: CPU run of {train_tflop:.1f} TFLOP pays back the compile time (>= {CPU_COMPILE_MIN_TFLOP:g})"


def describe_compiled(compiled: bool, device: torch.device) -> str:
    """What the log says was compiled."""
    if not compiled:
        return "nothing (eager)"
    parts = ["model forward+backward (inductor, dynamic=False)", "validation forward (no-grad graph)"]
    if device.type == "cuda":
        parts += ["Muon Newton-Schulz", "FlexAttention"]
    return ", ".join(parts)
