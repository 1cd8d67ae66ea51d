"""Step benchmark: tokens/s, achieved GFLOP/s and the fraction of the machine's measured sgemm peak,
with the share of each phase of a training step (data, forward+backward, DistAdam, Muon), eager and
compiled, for the training configurations of this machine.

    python bench/step_bench.py                                   # CPU default config, eager and compiled
    python bench/step_bench.py --config bytes --widths 64 128 256 512 --modes eager   # the muP lab's byte proxy
    python bench/step_bench.py --threads 1 --steps 3 --warmup 1
    python bench/step_bench.py --validation                      # also: one validation pass, eager vs compiled
    python bench/step_bench.py --chunked-loss off on             # the record's readout vs core/chunked_loss.py

Configurations: `default` is `train.py`'s CPU (or CUDA) default; `bytes` is the byte-vocabulary proxy
(vocabulary 257, depth 4, head_dim 32, 4096 tokens/step in 512-token sequences) at each `--widths`.
The sgemm peak is measured in the same process, at the same thread count, just before the table
(best of several 2048^3 fp32 matmuls on a CPU, bf16 on CUDA). FLOPs are `core/mfu.py`'s analytic count
at the mid-run attention window (training only: Muon's Newton-Schulz is shown apart, as "NS5 GFLOP/step",
and not counted in GFLOP/s). Each phase is timed with a device synchronisation around it (honest on
CUDA too). The load average is printed at the start and the end: on a shared machine, compare rows of
one table, and repeat a table whose load was high. README and METRICS_ANALYSIS quote this table.
`--chunked-loss off on` runs every row with the record's unchunked readout + soft-cap + cross-entropy
(`off`, the default) and with the chunked one (`on`, core/chunked_loss.py; validation too), column "loss".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model  # noqa: E402

import torch  # noqa: E402

from core.config import TrainConfig, grad_accum_steps, resolve_defaults  # noqa: E402
from core.data import BatchLoader, resolve_data, val_batches  # noqa: E402
from core.distributed import DistInfo, pick_device  # noqa: E402
from core.mfu import flops_per_token  # noqa: E402
from core.schedule import window_blocks  # noqa: E402
from core.trainer import (build_model, build_optimizer_pair, evaluate, forward_backward,  # noqa: E402
                          resolve_vocab, set_schedules)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} x {torch.get_num_threads()} threads"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgemm_peak(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul (fp32 on CPU, bf16 on CUDA): the machine's dense peak here."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def make_config(name: str, width: int | None, device: torch.device) -> TrainConfig:
    if name == "default":
        cfg = TrainConfig(spectral_every=0, activations=False)
    elif name == "bytes":  # the muP lab's byte-level proxy (scripts/transfer_lab.sh), 4096 tokens/step
        cfg = TrainConfig(width=width, depth=4, head_dim=32, seq_len=512, batch_tokens=4096, val_seq_len=512,
                          data="embedded-bytes", window_max=512, spectral_every=0, activations=False)
    else:
        raise ValueError(f"unknown configuration {name!r}: use default or bytes")
    if name == "default" and width is not None:
        cfg.width = width
    resolve_defaults(cfg, device.type, env={})
    return cfg


def step_flops(cfg: TrainConfig, model, window: int) -> float:
    mc = model.cfg
    fpt = flops_per_token(depth=cfg.depth, width=cfg.width, head_dim=cfg.head_dim, vocab_size=mc.padded_vocab,
                          mlp_ratio=mc.mlp_ratio, attn_layers=[mc.has_attention(i) for i in range(cfg.depth)],
                          window_tokens=[128 * (window if mc.uses_long_window(i) else max(1, window // 2))
                                         for i in range(cfg.depth)], seq_len=cfg.seq_len)
    return fpt * cfg.batch_tokens


def ns5_flops(muon) -> float:
    """FLOPs of one Muon step's Newton-Schulz (5 iterations of X X^T, A A, B X on the wide orientation)."""
    total = 0.0
    for g in muon.param_groups:
        for p in g["params"]:
            m, n = sorted(p.shape[-2:])
            batch = p.numel() // (m * n)
            total += batch * 5 * (4 * m * m * n + 2 * m ** 3)
    return total


def profile_step(run_one_step, top: int) -> list[tuple[float, str]]:
    """(share of the step's self CPU time, op or kernel name) of the `top` costliest entries of one profiled step.
    Compiled CPU kernels show up by name because main() turns on inductor's kernel profiling first. On CUDA this
    is host time only (kernels run asynchronously): use a GPU profiler there."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_one_step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [(e.self_cpu_time_total / total, e.key) for e in events[:top]]


def bench(cfg: TrainConfig, device, compiled: bool, steps: int, warmup: int, validation: bool,
          profile_top: int = 0, chunked: bool = False) -> dict:
    data = resolve_data(cfg.data_dir, data=cfg.data)
    resolve_vocab(cfg, data.vocab)
    model = build_model(cfg, device)
    adam, muon, _ = build_optimizer_pair(model, cfg)
    run_model = torch.compile(model, dynamic=False) if compiled else model
    accum = grad_accum_steps(cfg, 1)
    loader = BatchLoader(data.train_files, cfg.seq_len, accum, device=device, vocab=data.vocab)
    window = window_blocks(cfg.iterations // 2, cfg.iterations, cfg.window_max)
    phases = {"data": [], "fwd_bwd": [], "adam": [], "muon": []}
    t_start = time.perf_counter()
    warmup_s = 0.0

    def one_step(step: int) -> tuple[float, float, float, float]:
        sync(device)
        t0 = time.perf_counter()
        batches = loader.next_step()
        sync(device)
        t1 = time.perf_counter()
        forward_backward(run_model, batches, window, accum, chunked=chunked)
        sync(device)
        t2 = time.perf_counter()
        set_schedules(cfg, [adam, muon], muon, step)
        adam.step()
        sync(device)
        t3 = time.perf_counter()
        muon.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        return t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3

    for step in range(warmup + steps):
        times = one_step(step)
        if step == warmup - 1:
            warmup_s = time.perf_counter() - t_start
        if step >= warmup:
            for k, dt in zip(phases, times):
                phases[k].append(dt)
    step_t = [sum(x) for x in zip(*phases.values())]
    med = statistics.median(step_t)
    flops = step_flops(cfg, model, window)
    row = {"mode": "compiled" if compiled else "eager", "loss": "chunked" if chunked else "unchunked", "step_s": med, "tokens_per_s": cfg.batch_tokens / med,
           "gflops": flops / med / 1e9, "step_gflop": flops / 1e9, "warmup_s": warmup_s,
           "ns5_gflop": ns5_flops(muon) / 1e9,
           **{f"{k}_pct": 100 * statistics.median(v) / med for k, v in phases.items()}}
    if profile_top:
        row["profile"] = profile_step(lambda: one_step(warmup + steps), profile_top)
    if validation:  # one validation pass of the run's fixed set: first call (compiles), then timed
        val_tokens = cfg.val_tokens or data.val_tokens
        val_set = val_batches(data.val_files, cfg.val_seq_len, val_tokens, device=device, vocab=data.vocab)
        info = DistInfo(rank=0, local_rank=0, world_size=1, device=device, backend=None)
        t = time.perf_counter()
        evaluate(run_model, val_set[:1], window, info, chunked=chunked)
        row["val_first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        evaluate(run_model, val_set, window, info, chunked=chunked)
        row["val_pass_s"] = time.perf_counter() - t
        row["val_tokens"] = val_tokens
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["default", "bytes"], default="default")
    p.add_argument("--widths", type=int, nargs="*", help="widths to run (bytes: default 64 128 256 512)")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--steps", type=int, default=5, help="measured steps per row")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (compilation happens here)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. the cores)")
    p.add_argument("--validation", action="store_true", help="also time one validation pass per row")
    p.add_argument("--device", default="auto")
    p.add_argument("--chunked-loss", nargs="+", choices=["off", "on"], default=["off"],
                   help="loss paths to run each row with: off (the record's readout), on (core/chunked_loss.py)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after each row, profile one more step and print its N costliest ops/kernels (self CPU time)")
    a = p.parse_args(argv)
    if a.profile:  # name the compiled C++ kernels in the profile (a record per kernel call: only when profiling)
        import torch._inductor.config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    widths = a.widths or ([64, 128, 256, 512] if a.config == "bytes" else [None])
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    peak = sgemm_peak(device)
    header = ("| width | mode | loss | step (ms) | tokens/s | GFLOP/step | GFLOP/s | % of sgemm peak | data | fwd+bwd | "
              "DistAdam | Muon | NS5 GFLOP/step | warm-up (s) |" + (" val pass (s) | first val call (s) |" if a.validation else ""))
    print(f"machine: {machine_name(device)} | torch {torch.__version__} | measured sgemm peak "
          f"{peak / 1e9:.0f} GFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'} 2048^3, this process, before the rows)")
    print(f"load average (1 min) at the start: {load_start[0]:.2f}")
    first = True
    rows = [(w, mode, loss) for w in widths for mode in a.modes for loss in a.chunked_loss]
    for w, mode, loss in rows:
        cfg = make_config(a.config, w, device)
        r = bench(cfg, device, mode == "compiled", a.steps, a.warmup, a.validation, a.profile, loss == "on")
        if first:  # rows are printed as they finish, so a long table that is cut short keeps its rows
            print(f"config {a.config}: depth {cfg.depth} head_dim {cfg.head_dim} seq_len {cfg.seq_len} batch "
                  f"{cfg.batch_tokens} tokens vocab {cfg.vocab_size} | median of {a.steps} steps after "
                  f"{a.warmup} warm-up")
            print(header)
            print("|---" * (14 + 2 * a.validation) + "|")
            first = False
        line = (f"| {cfg.width} | {r['mode']} | {r['loss']} | {1000 * r['step_s']:.0f} | {r['tokens_per_s']:.0f} | "
                f"{r['step_gflop']:.1f} | {r['gflops']:.1f} | {100 * r['gflops'] * 1e9 / peak:.1f}% | "
                f"{r['data_pct']:.2f}% | {r['fwd_bwd_pct']:.1f}% | {r['adam_pct']:.1f}% | {r['muon_pct']:.1f}% | "
                f"{r['ns5_gflop']:.1f} | {r['warmup_s']:.1f} |")
        if a.validation:
            line += f" {r['val_pass_s']:.1f} | {r['val_first_s']:.1f} |"
        print(line, flush=True)
        for share, name in r.get("profile", []):
            print(f"    {100 * share:5.1f}%  {name[:110]}")
    peak_end = sgemm_peak(device)
    load_end = os.getloadavg()
    print(f"sgemm peak again after the rows: {peak_end / 1e9:.0f} GFLOP/s | load average (1 min) at the end: "
          f"{load_end[0]:.2f} | {time.perf_counter() - t_all:.0f} s | other processes share the cores: repeat a "
          "table whose load was high")
    return 0


if __name__ == "__main__":
    sys.exit(main())
