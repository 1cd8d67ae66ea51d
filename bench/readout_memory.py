"""Peak memory of the readout: the record's unchunked readout + soft-cap + cross-entropy against the chunked
one (core/chunked_loss.py), in an eager coordinate-check step and a validation forward (issue 21).

    python bench/readout_memory.py                          # vocab 50257 (50304 padded), width 768, depth 2, 4096 tokens
    python bench/readout_memory.py --tokens 8192 --activations

The shapes are the record's readout (50,304 padded vocabulary, width 768) at a reduced depth and token count.
Each (phase, loss path) runs in a fresh process, since a process's peak resident memory cannot be reset: it
builds the model (muP off, lm_head with small random weights) and one packed sequence of random tokens with
BOS tokens in it, notes its resident memory, then runs one phase:
  - "coord-check step": one eager forward + backward with the coordinate check recording (CoordRecorder, as
    `train.py --coord-check` steps; `--activations` adds the activation monitor's hooks), as the trainer's
    measuring steps run it;
  - "validation": one no-grad forward with reduction "mean", as `evaluate` runs it.
It reports the peak above that baseline: on a CPU the process's peak RSS (ru_maxrss) minus the RSS before the
phase, on CUDA `torch.cuda.max_memory_allocated` minus the allocated memory before. The table names the
machine and gives each peak in units of one full fp32 logit tensor (tokens x 50,304 x 4 bytes); the chunked
path should save at least two of them (issue 21's bar).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model  # noqa: E402

PHASES = ("coord-check step", "validation")
PATHS = ("unchunked", "chunked")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(a) -> dict:
    """One phase on one loss path, in this (fresh) process: the peak above the baseline, in MiB."""
    import torch

    from core.coord_check import CoordRecorder
    from core.model import GPT, GPTConfig
    from core.monitor import TrainingMonitor
    from core.steps import activation_modules

    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, depth=a.depth, width=a.width, head_dim=128, max_seq_len=a.tokens)).to(device)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5 / a.width ** 0.5)  # zero-initialised in the model: give z values
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50256, (a.tokens + 1,), generator=g)
    tokens[:: 997] = 50256  # documents of ~1000 tokens, split by the chunk boundaries
    inputs, targets = tokens[:-1].to(device), tokens[1:].to(device)
    chunked = a.path == "chunked"
    window = torch.tensor(a.tokens // 128, dtype=torch.int32, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    t = time.perf_counter()
    if a.phase == "validation":
        model.eval()
        with torch.no_grad():
            loss = model(inputs, targets, window, reduction="mean", chunked=chunked)
    else:
        rec = CoordRecorder(model)
        mon = TrainingMonitor(model, {}, log_every=1, spectral_every=0, activations=a.activations,
                              activation_modules=activation_modules(model), activation_every=1)
        with rec.recording(), mon.activation_hooks(1):
            loss = model(inputs, targets, window, chunked=chunked)
            loss.backward()
        rec.finish_step(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"phase": a.phase, "path": a.path, "peak_above_mib": peak - base, "seconds": time.perf_counter() - t,
            "loss": loss.item()}


def run_child(a, phase: str, path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--phase", phase, "--path", path, "--width", str(a.width),
           "--depth", str(a.depth), "--tokens", str(a.tokens), "--threads", str(a.threads), "--device", a.device]
    if a.activations:
        cmd.append("--activations")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} / {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} (CPU model name)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens in the one packed sequence (multiple of 128)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--activations", action="store_true", help="the activation monitor's hooks too, in the step")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    from core.chunked_loss import default_chunk_rows
    logit_mib = a.tokens * 50304 * 4 / 2**20
    rows = default_chunk_rows(50304)
    print(f"machine: {machine(a.device)} | {a.threads} thread(s) | load average (1 min) {os.getloadavg()[0]:.2f}")
    print(f"shapes: vocab 50257 (50,304 padded), width {a.width}, depth {a.depth}, {a.tokens} tokens in one sequence; "
          f"chunks of {rows} rows; one full fp32 logit tensor = {logit_mib:.0f} MiB"
          + (" | activation hooks on" if a.activations else ""))
    print("| phase | loss path | peak above baseline (MiB) | in fp32 logit tensors | time (s) | loss |")
    print("|---|---|---|---|---|---|")
    results = {}
    for phase in PHASES:
        for path in PATHS:
            r = results[phase, path] = run_child(a, phase, path)
            print(f"| {phase} | {path} | {r['peak_above_mib']:,.0f} | {r['peak_above_mib'] / logit_mib:.2f} | "
                  f"{r['seconds']:.1f} | {r['loss']:.6f} |", flush=True)
    for phase in PHASES:
        saved = results[phase, "unchunked"]["peak_above_mib"] - results[phase, "chunked"]["peak_above_mib"]
        print(f"{phase}: chunked saves {saved:,.0f} MiB = {saved / logit_mib:.2f} full fp32 logit tensors "
              f"({'>=' if saved >= 2 * logit_mib else 'below'} the bar of 2)")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
