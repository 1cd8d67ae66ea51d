"""Coordinate check: does the size of every activation stay flat as width grows?

Under a correct muP the typical coordinate size (mean |x|) of each layer type's output is the same at
every width, at init and after every training step; under the standard parametrisation some grow
with width (for this model mainly the logits, since Muon already keeps hidden updates width-free).

Two entry points:
  - `CoordRecorder`: used by `train.py --coord-check` to record sizes during a real run;
  - `python -m core.mup coord-check --widths 64 128 256 512 --steps 10 --seeds 3`: trains each width
    a few steps on the same data, muP and standard, writes PNG plots and prints a verdict per layer type.

Tokens per step matter. The hidden output projections start at zero and the readout too, so the first
nonzero attention/MLP outputs (step 2) come from ONE orthogonalised update whose row space is spanned
by one batch and applied to the next. With width << tokens per step that update is full-rank and acts
on all of a new token's input; as the width approaches the tokens it acts on a shrinking share, so
with few tokens per step the step-2 sizes fall with width under muP and SP alike (README "Coordinate
check" has the measurements). Hence the default of 4096 tokens per step. `--fixed-batch` repeats the first batch instead (microsoft/mup's `fix_data`),
which removes that effect but measures memorisation of one batch from step ~5 on.

Verdict (microsoft/mup's coord check looks for ~flat curves): the slope of log(size) vs log(width),
averaged over seeds, must stay within +-SLOPE_TOL for every hidden layer type at steps 1..N-1, and the
logits must not grow with width. Step 0 is the init: zero-initialised outputs (attention/MLP
projections, readout) are exactly zero there at every width, which passes trivially.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from core.attention import BLOCK_SIZE
from core.model import sequence_len_ok

LAYER_TYPES = ("embed", "attn", "mlp", "residual", "logits")
HIDDEN_TYPES = ("embed", "attn", "mlp", "residual")
SLOPE_TOL = 0.15          # ~ microsoft/mup's 1.2x per 4x width: log(1.2)/log(4) = 0.13
LOGIT_GROWTH_TOL = 0.15   # logits "must not grow": slope <= this


class CoordRecorder:
    """Forward hooks that accumulate mean |x| per layer type, attached only while recording."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows: list[dict] = []
        self._sums: dict[str, list[torch.Tensor]] = {}

    def _modules(self):
        m = self.model
        yield "embed", m.embed
        for block in m.blocks:
            if block.attn is not None:
                yield "attn", block.attn
            yield "mlp", block.mlp
            yield "residual", block
        yield "logits", m.lm_head  # pre-soft-cap logits, after the muP output multiplier

    @staticmethod
    def wants(step: int, every: int, steps: int) -> bool:
        return step < steps and step % every == 0

    @contextlib.contextmanager
    def recording(self):
        self._sums = {t: [] for t in LAYER_TYPES}
        handles = []
        for kind, module in self._modules():
            def hook(_mod, _inp, out, kind=kind):
                self._sums[kind].append(out.detach().float().abs().mean())
            handles.append(module.register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def finish_step(self, step: int) -> dict[str, float]:
        """Average over layers and micro-batches; one read-back for all types."""
        kinds = [k for k in LAYER_TYPES if self._sums.get(k)]
        if not kinds:
            raise RuntimeError("the coordinate check recorded nothing this step: the forward ran outside "
                               "`recording()` or on a compiled module whose graph ignores the hooks; run the "
                               "recorded steps on the eager model")
        stacked = torch.stack([torch.stack(self._sums[k]).mean() for k in kinds])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.AVG)  # every rank's share
        values = stacked.tolist()
        row = dict(zip(kinds, values))
        self.rows.append({"step": step, **row})
        return {f"CoordCheck/{k}": v for k, v in row.items()}

    def save(self, path: Path, **meta) -> Path:
        with open(path, "w") as f:
            for row in self.rows:
                f.write(json.dumps({**meta, **row}) + "\n")
        return path

    def wandb_metrics(self) -> dict[str, float]:
        return {f"CoordCheck/{k}_step{r['step']}": v for r in self.rows for k, v in r.items() if k != "step"}


# ---------------------------------------------------------------------------------------------
# Multi-width check


def check_config(width: int, base_width: int, use_mup: bool, seed: int, seq_len: int, depth: int, head_dim: int):
    """One coordinate-check run: the CPU defaults (eager, no FP8), one packed sequence of `seq_len` tokens
    per step, a constant LR (no cooldown within the few steps), spectral norms and activation hooks off."""
    from core.config import TrainConfig, resolve_defaults
    cfg = TrainConfig(width=width, depth=depth, head_dim=head_dim, seq_len=seq_len, batch_tokens=seq_len,
                      val_seq_len=seq_len, iterations=1000, cooldown_frac=0.0, seed=seed, mup=use_mup,
                      base_width=base_width if use_mup else None, spectral_every=0, activations=False)
    return resolve_defaults(cfg, "cpu", env={})


class _RepeatFirstBatch:
    """Wraps a loader so that every step returns its first batch (microsoft/mup's `fix_data=True`)."""

    def __init__(self, loader):
        self._batch = loader.next_step()

    def next_step(self):
        return self._batch


def measure(widths: list[int], steps: int, seeds: list[int], *, use_mup: bool, seq_len: int = 256,
            depth: int = 4, head_dim: int = 32, fixed_batch: bool = False, orthogonalizer: str = "ns5",
            device: str = "cpu", data_files=None, log=print) -> dict:
    """{width: {seed: [ {type: size} per step ]}} for training `steps` steps at each width.

    Every width and seed sees the same batches: fresh ones each step as in training (default), or the
    first batch repeated (`fixed_batch`, the default of microsoft/mup's `_get_coord_data`).
    `orthogonalizer` "svd" swaps Muon's NS5 for the exact polar factor, to tell muP's effects from
    NS5's approximation. The model runs eagerly (forward hooks do not fire in a compiled graph).
    """
    from core.data import BatchLoader, resolve_data
    from core.optimizers import ORTHOGONALIZERS
    from core.trainer import build_model, build_optimizer_pair, forward_backward, set_schedules
    if data_files is None:
        data_files = resolve_data(None).train_files
    base = min(widths)
    out = {}
    for width in widths:
        out[width] = {}
        for seed in seeds:
            cfg = check_config(width, base, use_mup, seed, seq_len, depth, head_dim)
            model = build_model(cfg, torch.device(device))
            adam, muon, _ = build_optimizer_pair(model, cfg)
            muon.orthogonalize = ORTHOGONALIZERS[orthogonalizer]
            loader = BatchLoader(data_files, seq_len, 1, device=device)
            if fixed_batch:
                loader = _RepeatFirstBatch(loader)
            rec = CoordRecorder(model)
            for step in range(steps):
                with rec.recording():
                    forward_backward(model, loader.next_step(), 1, 1)
                rec.finish_step(step)
                set_schedules(cfg, [adam, muon], muon, step)
                adam.step()
                muon.step()
                model.zero_grad(set_to_none=True)
            out[width][seed] = [{k: r[k] for k in LAYER_TYPES if k in r} for r in rec.rows]
        log(f"  {'muP' if use_mup else 'SP '} width {width}: done ({len(seeds)} seed(s) x {steps} steps)")
    return out


def slopes(sizes: dict, steps: int) -> dict[str, list[float | None]]:
    """Per layer type and step: slope of log(size) vs log(width), averaged over seeds. None when all zero."""
    widths = sorted(sizes)
    seeds = list(sizes[widths[0]])
    result = {}
    for kind in LAYER_TYPES:
        per_step = []
        for step in range(steps):
            seed_slopes = []
            for seed in seeds:
                ys = [sizes[w][seed][step].get(kind, 0.0) for w in widths]
                if all(y == 0.0 for y in ys):
                    continue
                if any(y <= 0.0 for y in ys):
                    seed_slopes.append(math.inf)  # zero at some widths only: not flat
                    continue
                xs = [math.log(w) for w in widths]
                ls = [math.log(y) for y in ys]
                mx, my = statistics.fmean(xs), statistics.fmean(ls)
                seed_slopes.append(sum((x - mx) * (y - my) for x, y in zip(xs, ls)) / sum((x - mx) ** 2 for x in xs))
            per_step.append(statistics.fmean(seed_slopes) if seed_slopes else None)
        result[kind] = per_step
    return result


def verdict(slope_table: dict[str, list[float | None]]) -> dict[str, tuple[bool, float]]:
    """{type: (passed, worst slope)} over steps >= 1."""
    out = {}
    for kind, per_step in slope_table.items():
        vals = [s for s in per_step[1:] if s is not None]
        if not vals:
            out[kind] = (True, 0.0)
            continue
        if kind == "logits":
            worst = max(vals)
            out[kind] = (worst <= LOGIT_GROWTH_TOL, worst)
        else:
            worst = max(vals, key=abs)
            out[kind] = (abs(worst) <= SLOPE_TOL, worst)
    return out


def plot(results: dict[str, dict], steps: int, path: Path) -> Path:
    """One panel per layer type and parametrisation: size vs width (log-log), one line per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params = list(results)
    fig, axes = plt.subplots(len(params), len(LAYER_TYPES), figsize=(3.2 * len(LAYER_TYPES), 3.0 * len(params)),
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, name in enumerate(params):
        sizes = results[name]
        widths = sorted(sizes)
        seeds = list(sizes[widths[0]])
        for c, kind in enumerate(LAYER_TYPES):
            ax = axes[r][c]
            for step in range(steps):
                ys = [statistics.fmean(sizes[w][s][step].get(kind, 0.0) for s in seeds) for w in widths]
                if all(y > 0 for y in ys):
                    ax.plot(widths, ys, marker="o", ms=3, color=cmap(step / max(steps - 1, 1)), label=f"t={step}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{name}: {kind}", fontsize=9)
            ax.set_xlabel("width", fontsize=8)
            if c == 0:
                ax.set_ylabel("mean |x|", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle("Coordinate check: activation size vs width (flat = width-independent)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_check(widths: list[int], steps: int, seeds: list[int], out_dir: Path, *, log=print, **setup) -> dict:
    """Both parametrisations; writes coord_check.png and coord_check.json; returns the verdicts.

    `setup` holds measure()'s keyword arguments (seq_len, depth, head_dim, fixed_batch, orthogonalizer,
    device); they are saved in the JSON so that every figure says how it was made.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results, report = {}, {}
    for name, use_mup in (("muP", True), ("SP", False)):
        results[name] = measure(widths, steps, seeds, use_mup=use_mup, log=log, **setup)
        table = slopes(results[name], steps)
        report[name] = {"slopes": table, "verdict": verdict(table)}
    plot(results, steps, out_dir / "coord_check.png")
    with open(out_dir / "coord_check.json", "w") as f:
        json.dump({"widths": widths, "steps": steps, "seeds": seeds, "setup": setup,
                   "sizes": {n: {str(w): v for w, v in r.items()} for n, r in results.items()},
                   "report": report}, f, indent=1)
    return report


def format_report(report: dict) -> str:
    lines = [f"{'layer type':<10} " + "  ".join(f"{n + ' slope':>14} {'':<4}" for n in report)]
    for kind in LAYER_TYPES:
        cells = []
        for name in report:
            ok, worst = report[name]["verdict"][kind]
            cells.append(f"{worst:>+14.3f} {'PASS' if ok else 'FAIL'}")
        lines.append(f"{kind:<10} " + "  ".join(cells))
    for name in report:
        ok = all(v[0] for v in report[name]["verdict"].values())
        lines.append(f"{name}: {'PASS' if ok else 'FAIL'} (worst slope of log size vs log width over steps >= 1; "
                     f"hidden must stay within +-{SLOPE_TOL}, logits must not exceed +{LOGIT_GROWTH_TOL})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.mup coord-check",
                                description="Coordinate check of muP vs the standard parametrisation across widths.")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds to average the slopes over")
    p.add_argument("--seq-len", type=int, default=4096,
                   help="tokens per step (one packed sequence); the first updates are only width-free with "
                        "enough tokens, see README 'Coordinate check'")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--fixed-batch", action="store_true",
                   help="train every step on the first batch (microsoft/mup's fix_data) instead of fresh batches")
    p.add_argument("--orthogonalizer", choices=["ns5", "svd"], default="ns5",
                   help="Muon's orthogonalisation: the record's NS5, or the exact polar factor (diagnostic)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when available) or cpu")
    p.add_argument("--out-dir", default="logs/coord_check")
    a = p.parse_args(argv)
    if len(a.widths) < 2:
        p.error("--widths needs at least two widths (the check fits a slope across widths)")
    for w in a.widths:
        if w <= 0 or w % a.head_dim:
            p.error(f"width {w} must be a positive multiple of --head-dim {a.head_dim}")
    if a.steps < 2 or a.seeds < 1:
        p.error("--steps must be >= 2 and --seeds >= 1")
    if not sequence_len_ok(a.seq_len):
        p.error(f"--seq-len {a.seq_len} must be a positive multiple of {BLOCK_SIZE} (the attention block size)")
    if a.device not in ("cpu", "cuda") or (a.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device {a.device!r}: use cpu" + ("" if torch.cuda.is_available() else " (no CUDA device here)"))
    report = run_check(sorted(a.widths), a.steps, list(range(a.seeds)), Path(a.out_dir), seq_len=a.seq_len,
                       depth=a.depth, head_dim=a.head_dim, fixed_batch=a.fixed_batch,
                       orthogonalizer=a.orthogonalizer, device=a.device)
    print(format_report(report))
    print(f"plots: {Path(a.out_dir) / 'coord_check.png'}  data: {Path(a.out_dir) / 'coord_check.json'}")
    return 0 if all(v[0] for v in report["muP"]["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
