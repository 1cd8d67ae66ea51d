"""Spectral-norm accuracy and cost of every core/spectral.py mode, against exact float64 SVD values.

Run (CPU, ~15 minutes on 2 cores, most of it training the model for the "trained" family):

    python bench/spectral_accuracy.py                          # train the project's model, then measure
    python bench/spectral_accuracy.py --step-ms 100            # also: amortised cost at a 100 ms step
    python bench/spectral_accuracy.py --save-checkpoint m.pt   # keep the trained matrices ...
    python bench/spectral_accuracy.py --checkpoint m.pt        # ... and measure them again without training
    python bench/spectral_accuracy.py --checkpoint logs/<run>/checkpoints/step_001750.pt   # a train.py checkpoint
    python bench/spectral_accuracy.py --device cuda --step-ms 100   # time the modes on a GPU
    python bench/spectral_accuracy.py --json out.json          # machine-readable copy of every number
    python bench/spectral_accuracy.py --tracking-only --seq-len 256 --train-steps 300 --track-every 20
                                     # only the trackers during training: every 20 and every 100 (the default) steps

Prints (1) the machine; (2) a table mode x matrix family of the median / max |relative error|,
the mean signed error (bias), the NS fallback rate and the time per call, where the families are
  gaussian  N(0, 1/n) matrices of one record block's shapes at width 768 (q, k, v, o, fc, proj),
  spiked    the same plus a rank-one spike of 3 (a well-separated top singular value),
  trained   the Muon hidden matrices of core/model.py trained with core/optimizers.py on this CPU
            (or loaded from --checkpoint);
(3) the default `SpectralNormTracker` warm-started during that training, as the monitor uses it
(its error at every call after the first, the first being a cold start); (4) the amortised cost of
a warm call at the default interval (MONITOR_SPECTRAL_EVERY=100), relative to the step time
measured here and to --step-ms. Relative error = estimate / exact - 1, exact =
`torch.linalg.matrix_norm(W.double(), ord=2)`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model  # noqa: E402

from core.spectral import SpectralNormTracker, matrix_slices, spectral_norms  # noqa: E402

DEFAULT_INTERVAL = 100  # MONITOR_SPECTRAL_EVERY default (core/config.py)
RECORD_WIDTH = 768


# ---------------------------------------------------------------------------------------------
# machine and timing


def machine() -> str:
    cpu = cpu_model()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{cpu} | {os.cpu_count()} cores, torch threads {torch.get_num_threads()} | torch {torch.__version__} | "
            f"python {platform.python_version()} | load average {load}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time in ms over `repeats` calls (after one untimed call), and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times), out


# ---------------------------------------------------------------------------------------------
# matrix families


def record_block_shapes(width: int = RECORD_WIDTH) -> dict[str, tuple[int, int]]:
    return {"q": (width, width), "k": (width, width), "v": (width, width), "o": (width, width),
            "fc": (4 * width, width), "proj": (width, 4 * width)}


def gaussian_family(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(m, k, generator=g) / math.sqrt(k) for n, (m, k) in record_block_shapes().items()}


def spiked_family(seed: int = 0, strength: float = 3.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for n, W in gaussian_family(seed).items():
        u, v = torch.randn(W.shape[0], 1, generator=g), torch.randn(W.shape[1], 1, generator=g)
        out[n] = W + strength * (u / u.norm()) @ (v / v.norm()).T
    return out


def hidden_matrices(named_params) -> dict[str, torch.Tensor]:
    """The Muon hidden matrices (blocks.*, 2D or 3D), split as the monitor splits them."""
    mats = {}
    for name, p in named_params:
        if name.startswith("blocks.") and p.ndim >= 2:
            for sub, m in matrix_slices(name, p):
                mats[sub] = m.detach().float().clone()
    return mats


def exact_norms(mats: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: torch.linalg.matrix_norm(W.double(), ord=2).item() for n, W in mats.items()}


def train_and_track(args) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the project's model on CPU; run trackers during training as the monitor would."""
    from core.config import TrainConfig, resolve_defaults
    from core.data import BatchLoader, resolve_data
    from core.schedule import window_blocks
    from core.steps import build_model, build_optimizer_pair, forward_backward, set_schedules

    cfg = TrainConfig(width=args.width, depth=args.depth, head_dim=args.head_dim, seq_len=args.seq_len,
                      batch_tokens=args.seq_len, iterations=args.train_steps, device="cpu")
    resolve_defaults(cfg, "cpu", env={})
    device = torch.device("cpu")
    data = resolve_data(args.data_dir)
    model = build_model(cfg, device)
    adam, muon, _ = build_optimizer_pair(model, cfg)
    loader = BatchLoader(data.train_files, cfg.seq_len, 1, device=device)
    # trackers as the monitor uses them: (label, interval, tracker); the defaults first
    d = SpectralNormTracker()
    trackers = [
        (f"default (block {d.block_size}, {d.warm_iters} warm it)", args.track_every, SpectralNormTracker()),
        (f"default, every {5 * args.track_every} steps", 5 * args.track_every, SpectralNormTracker()),
        (f"block {d.block_size}, 8 warm it", args.track_every, SpectralNormTracker(warm_iters=8)),
        (f"block {d.block_size}, 4 warm it", args.track_every, SpectralNormTracker(warm_iters=4)),
        (f"single vector (block 1, {d.warm_iters} warm it)", args.track_every, SpectralNormTracker(block_size=1)),
        (f"no warm start (cold, {d.cold_iters} it each call)", args.track_every, SpectralNormTracker()),
    ]
    track = {label: {"interval": every, "cold": [], "warm": [], "warm_ms": [], "residual": []}
             for label, every, _ in trackers}
    step_ms, losses = [], []
    print(f"training core/model.py: width {cfg.width} depth {cfg.depth} head_dim {cfg.head_dim} seq {cfg.seq_len} "
          f"for {cfg.iterations} steps on {data.name} data (Muon + DistAdam, record LRs)", flush=True)
    for step in range(cfg.iterations + 1):
        if step > 0:
            t = time.perf_counter()
            loss = forward_backward(model, loader.next_step(), window_blocks(step, cfg.iterations, cfg.window_max), 1)
            set_schedules(cfg, [adam, muon], muon, step)
            adam.step()
            muon.step()
            model.zero_grad(set_to_none=True)
            step_ms.append(1000 * (time.perf_counter() - t))
            losses.append(loss.item() / cfg.seq_len)
            if step % 25 == 0:
                print(f"  step {step}: train loss {losses[-1]:.3f}, {statistics.median(step_ms[-25:]):.0f} ms/step",
                      flush=True)
        due = [(label, tr) for label, every, tr in trackers if step % every == 0]
        if not due:
            continue
        mats = hidden_matrices(model.named_parameters())
        ex = exact_norms(mats)
        for label, tr in due:
            if label.startswith("no warm start"):
                tr.reset()
            t = time.perf_counter()
            est = tr.estimate(mats)
            ms = 1000 * (time.perf_counter() - t)
            errs = [est.norms[i].item() / ex[n] - 1 if ex[n] > 0 else 0.0 for i, n in enumerate(est.names)]
            rec = track[label]
            if step == 0:  # every tracker's first call is cold
                rec["cold"] += errs
            else:
                rec["warm"] += errs
                rec["warm_ms"].append(ms)
                rec["residual"].append(est.residuals.max().item())
    info = {"width": cfg.width, "depth": cfg.depth, "head_dim": cfg.head_dim, "seq_len": cfg.seq_len,
            "steps": cfg.iterations, "step_ms_median": statistics.median(step_ms),
            "loss_first": losses[0], "loss_last": statistics.mean(losses[-10:]), "tracking": track}
    if args.save_checkpoint:
        torch.save({"hidden": hidden_matrices(model.named_parameters()), "info": info}, args.save_checkpoint)
        print(f"saved the trained hidden matrices to {args.save_checkpoint}")
    return hidden_matrices(model.named_parameters()), info


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Hidden matrices from a GPT state_dict, a {'model': state_dict} checkpoint, or a --save-checkpoint
    file (which also holds the tracker measurements of the run that trained them)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "hidden" in state:
        return {k: v.float() for k, v in state["hidden"].items()}, state.get("info")
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    mats = hidden_matrices((k.removeprefix("_orig_mod."), v) for k, v in state.items())
    if not mats:
        raise SystemExit(f"{path}: no blocks.* matrices found; pass a GPT state_dict (or {{'model': state_dict}}) "
                         f"or a file written by --save-checkpoint")
    return mats, None


# ---------------------------------------------------------------------------------------------
# measurements


def mode_rows(family: str, mats: dict[str, torch.Tensor], repeats: int, device: torch.device) -> list[dict]:
    ex = exact_norms(mats)
    mats = {n: W.to(device) for n, W in mats.items()}
    nonzero = [n for n in mats if ex[n] > 0]
    rows = []

    def row(label, fn):
        ms, est = timed(fn, repeats, device)
        errs = [est.norms[est.names.index(n)].item() / ex[n] - 1 for n in nonzero]
        fb = est.used_fallback
        rows.append({
            "family": family, "mode": label, "matrices": len(mats),
            "median_abs_err": statistics.median(abs(e) for e in errs), "max_abs_err": max(abs(e) for e in errs),
            "mean_err": statistics.mean(errs),
            "fallback_rate": None if fb is None else fb.float().mean().item(),
            "ms_per_call": ms, "ms_per_matrix": ms / len(mats)})

    row("power, cold (30 it)", lambda: spectral_norms(mats, "power"))
    warm = SpectralNormTracker()
    warm.estimate(mats)
    row(f"power, warm ({warm.warm_iters} it; default)", lambda: warm.estimate(mats))
    for mode in ("ns5-fast", "ns3-accurate"):
        row(f"{mode} (with fallback)", lambda m=mode: spectral_norms(mats, m))
        row(f"{mode} raw (no fallback)", lambda m=mode: spectral_norms(mats, m, ns_fallback_residual=math.inf))
    row("exact (float64 SVD)", lambda: spectral_norms(mats, "exact"))
    return rows


def record_shapes_warm_ms(repeats: int, device: torch.device) -> tuple[int, float]:
    """Warm-call time for every hidden matrix of the 12-layer width-768 record model (11 attention layers)."""
    mats = {}
    for layer in range(12):
        for n, W in gaussian_family(seed=layer).items():
            if layer == 7 and n in "qkvo":  # the record's block 7 has no attention
                continue
            mats[f"{layer}.{n}"] = W.to(device)
    tr = SpectralNormTracker()
    tr.estimate(mats)
    ms, _ = timed(lambda: tr.estimate(mats), repeats, device)
    return len(mats), ms


def pct(x: float | None, decimals: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{decimals}f}%"


def print_tracking(train_info: dict) -> None:
    """The table of the trackers warm-started during training."""
    print(f"\nTrackers warm-started during training (width {train_info['width']}, seq_len {train_info['seq_len']}, "
          f"{train_info['steps']} steps, "
          f"loss {train_info['loss_first']:.2f} -> {train_info['loss_last']:.2f}, "
          f"{train_info['step_ms_median']:.0f} ms/step median); error over every matrix at every warm call:")
    print(f"{'tracker':40} {'every':>5} {'calls':>5} {'median|err|':>11} {'max|err|':>9} {'max resid':>9} "
          f"{'cold max|err|':>13} {'warm ms':>8}")
    for label, rec in train_info["tracking"].items():
        w = [abs(e) for e in rec["warm"]]
        if not w:
            print(f"{label:40} {rec['interval']:5d}     0  (no call after the first: run more --train-steps)")
            continue
        print(f"{label:40} {rec['interval']:5d} {len(rec['warm_ms']):5d} {pct(statistics.median(w), 3):>11} "
              f"{pct(max(w), 3):>9} {max(rec['residual']):9.2e} {pct(max(abs(e) for e in rec['cold']), 3):>13} "
              f"{statistics.median(rec['warm_ms']):8.1f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", help="GPT state_dict (or --save-checkpoint file) to take trained matrices from")
    p.add_argument("--save-checkpoint", help="write the trained hidden matrices here")
    p.add_argument("--width", type=int, default=256, help="model width for the trained family")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training step")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--track-every", type=int, default=10, help="tracker interval during training (steps)")
    p.add_argument("--data-dir", default=None, help="as train.py --data-dir (default: FineWeb if present, else embedded)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the modes are timed (auto: cuda if available); training is always on the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (median)")
    p.add_argument("--step-ms", type=float, default=None, help="a training step time to amortise the warm call over")
    p.add_argument("--json", default=None, help="also write every number here")
    p.add_argument("--tracking-only", action="store_true",
                   help="only train and report the trackers warm-started during training (skips the static families)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")

    gpu = f" | timing on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else " | timing on the CPU"
    print(f"machine: {machine()}{gpu}", flush=True)
    families = {} if args.tracking_only else {"gaussian": gaussian_family(), "spiked": spiked_family()}
    train_info = None
    if args.checkpoint:
        families["trained"], train_info = load_checkpoint(args.checkpoint)
        print(f"trained matrices: {len(families['trained'])} from {args.checkpoint}"
              + (" (with the tracker measurements of the run that saved them)" if train_info else ""))
    else:
        families["trained"], train_info = train_and_track(args)

    if args.tracking_only:
        if train_info is None:
            raise SystemExit("--tracking-only needs training (drop --checkpoint)")
        result = {"machine": machine() + gpu, "training": train_info}
        print_tracking(train_info)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f"\nwrote {args.json}")
        return result
    rows = []
    for fam, mats in families.items():
        rows += mode_rows(fam, mats, args.repeats, device)
    shapes = {fam: sorted({tuple(m.shape) for m in mats.values()}) for fam, mats in families.items()}

    print("\nSpectral-norm estimate vs exact (relative error = estimate/exact - 1)")
    for fam in families:
        print(f"  {fam}: {len(families[fam])} matrices, shapes {', '.join(f'{a}x{b}' for a, b in shapes[fam])}")
    head = f"{'family':9} {'mode':30} {'median|err|':>11} {'max|err|':>9} {'mean err':>9} {'fallback':>8} {'ms/call':>9} {'ms/matrix':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['family']:9} {r['mode']:30} {pct(r['median_abs_err'], 3):>11} {pct(r['max_abs_err'], 3):>9} "
              f"{pct(r['mean_err'], 3):>9} {pct(r['fallback_rate'], 0):>8} {r['ms_per_call']:9.1f} {r['ms_per_matrix']:9.2f}")

    result = {"machine": machine() + gpu, "rows": rows, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}}
    if train_info is not None:
        print_tracking(train_info)
        result["training"] = train_info

    print(f"\nAmortised cost of the default (warm) call at MONITOR_SPECTRAL_EVERY={DEFAULT_INTERVAL}:")
    trained_ms = next(r["ms_per_call"] for r in rows if r["family"] == "trained" and r["mode"].startswith("power, warm"))
    n_record, record_ms = record_shapes_warm_ms(args.repeats, device)
    result["record_shapes"] = {"matrices": n_record, "warm_ms": record_ms, "device": str(device)}
    print(f"  trained family ({len(families['trained'])} matrices) on {device}: {trained_ms:.1f} ms per call")
    print(f"  record model shapes (width 768, {n_record} matrices) on {device}: {record_ms:.1f} ms per call")
    if train_info is not None and device.type == "cpu":
        share = trained_ms / (DEFAULT_INTERVAL * train_info["step_ms_median"])
        result["amortised_vs_measured_step"] = share
        print(f"  trained family vs this run's {train_info['step_ms_median']:.0f} ms CPU training step: "
              f"{pct(share, 3)} of step time")
    if args.step_ms:
        share = record_ms / (DEFAULT_INTERVAL * args.step_ms)
        result["amortised_record_vs_step_ms"] = share
        note = "" if device.type == "cuda" else (
            " -- the call was timed on the CPU: compare with a CPU step time, or run with --device cuda")
        print(f"  record shapes vs --step-ms {args.step_ms:g}: {pct(share, 3)} of step time{note}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
