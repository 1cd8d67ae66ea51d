"""Step benchmark: tokens/s eager vs compiled, and the share of a step spent in data loading and
in the optimizer step, for the training configuration of this machine (CPU defaults on a CPU).

    python bench/step_bench.py                  # CPU default config, eager and compiled
    python bench/step_bench.py --steps 20 --no-compile
    python bench/step_bench.py --width 256 --seq-len 512

Each phase is timed with a device synchronisation around it (so the numbers are honest on CUDA too);
the table names the machine. The README quotes this table.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model  # noqa: E402

import torch  # noqa: E402

from core.config import TrainConfig, grad_accum_steps, resolve_defaults  # noqa: E402
from core.data import BatchLoader, resolve_data  # noqa: E402
from core.distributed import pick_device  # noqa: E402
from core.trainer import build_model, build_optimizer_pair, forward_backward, set_schedules  # noqa: E402


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} x {torch.get_num_threads()} threads"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg: TrainConfig, device, compiled: bool, steps: int, warmup: int) -> dict:
    files = resolve_data(cfg.data_dir).train_files
    model = build_model(cfg, device)
    adam, muon, _ = build_optimizer_pair(model, cfg)
    run_model = torch.compile(model, dynamic=False) if compiled else model
    accum = grad_accum_steps(cfg, 1)
    loader = BatchLoader(files, cfg.seq_len, accum, device=device)
    data_t, fb_t, opt_t = [], [], []
    t_compile = time.perf_counter()
    for step in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        batches = loader.next_step()
        sync(device)
        t1 = time.perf_counter()
        forward_backward(run_model, batches, 4, accum)
        sync(device)
        t2 = time.perf_counter()
        set_schedules(cfg, [adam, muon], muon, step)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if step == warmup - 1:
            t_compile = time.perf_counter() - t_compile
        if step >= warmup:
            data_t.append(t1 - t0)
            fb_t.append(t2 - t1)
            opt_t.append(t3 - t2)
    step_t = [a + b + c for a, b, c in zip(data_t, fb_t, opt_t)]
    med = statistics.median(step_t)
    return {"mode": "compiled" if compiled else "eager", "step_ms": 1000 * med,
            "tokens_per_s": cfg.batch_tokens / med,
            "data_pct": 100 * statistics.median(data_t) / med, "fwd_bwd_pct": 100 * statistics.median(fb_t) / med,
            "opt_pct": 100 * statistics.median(opt_t) / med, "warmup_s": t_compile}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation happens here)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled mode")
    p.add_argument("--width", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    cfg = resolve_defaults(TrainConfig(width=a.width, depth=a.depth, seq_len=a.seq_len, batch_tokens=a.batch_tokens,
                                       spectral_every=0, activations=False), device.type, env={})
    rows = [bench(cfg, device, False, a.steps, a.warmup)]
    if not a.no_compile:
        rows.append(bench(cfg, device, True, a.steps, a.warmup))
    import os
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other processes share the cores: compare rows, not machines)")
    print(f"machine: {machine_name(device)} | torch {torch.__version__} | config: depth {cfg.depth} width {cfg.width} "
          f"seq_len {cfg.seq_len} batch {cfg.batch_tokens} tokens | median of {a.steps} steps after {a.warmup} warm-up")
    print(f"| mode | step (ms) | tokens/s | data loading | forward+backward | optimizer step | warm-up (s) |")
    print(f"|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['step_ms']:.0f} | {r['tokens_per_s']:.0f} | {r['data_pct']:.2f}% | "
              f"{r['fwd_bwd_pct']:.1f}% | {r['opt_pct']:.1f}% | {r['warmup_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
