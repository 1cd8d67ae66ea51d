"""Coordinate check: does the size of every activation stay flat as width grows?

Under a correct muP the typical coordinate size (mean |x|) of each layer type's output is the same at
every width, at init and after every training step; under the standard parametrisation some grow
with width (for this model mainly the logits, since Muon already keeps hidden updates width-free).

Three entry points:
  - `CoordRecorder`: used by `train.py --coord-check` to record sizes during a real run;
  - `python -m core.coord_check --widths 64 128 256 512 --steps 10 --seeds 3` (also under its old name
    `python -m core.mup coord-check`): trains each width a few steps on the same data, muP and standard,
    with the trainer's building blocks (core/steps.py), writes PNG plots and prints a verdict per layer type;
  - `python -m core.coord_check --depths 2 4 8 16 32 --width 64 --depth-mup completep --steps 10 --seeds 3
    --seq-len 256 --data embedded-bytes [--base-depth 2] [--depth-mistakes depth-skips-unscaled ...]`: the same
    across depths at one width (depth muP, core/depth_mup.py), see "Depth check" below. Exit code 0 iff the
    chosen rule passes.

Tokens per step matter. The hidden output projections start at zero and the readout too, so the first
nonzero attention/MLP outputs (step 2) come from ONE orthogonalised update whose row space is spanned
by one batch and applied to the next. With width << tokens per step that update is full-rank and acts
on all of a new token's input; as the width approaches the tokens it acts on a shrinking share, so
with few tokens per step the step-2 sizes fall with width under muP and SP alike (README "Coordinate
check" has the measurements). Hence the default of 4096 tokens per step. `--fixed-batch` repeats the first batch instead (microsoft/mup's `fix_data`),
which removes that effect but measures memorisation of one batch from step ~5 on.

What is measured, per layer type (averaged over layers and micro-batches): mean |x| of the embedding,
attention, MLP and block (residual) outputs; `readout`, the lm_head output z = x W^T times the muP output
multiplier; `logits`, z / soft-cap divisor, which is what enters 30 sigmoid(.) (under SP the divisor is
7.5 sqrt(d), under muP 7.5 sqrt(d0)). The multi-width check also records `<type>_delta`, mean |x_t - x_0|:
the change of that output since init on the same input (Tensor Programs: every layer's features must
move by Theta(1)); it catches an embedding whose LR shrinks with width, which the size alone hides
behind the N(0, 1) init.

Verdict (microsoft/mup's coord check looks for ~flat curves): the slope of log(size) vs log(width),
averaged over seeds, must stay within +-SLOPE_TOL for every judged type at steps 1..N-1 (two-sided: a
type that shrinks with width fails as one that grows does; `readout` is reported, not judged, since
`logits` is what the loss sees). Step 0 is the init, where the zero-initialised outputs (attention/MLP
projections, readout) are exactly zero; at step 1 the hidden ones still are (a zero readout gives the
hidden layers a zero gradient at step 0). From step 2 on, a type that is exactly zero at every width
FAILS: it is not learning, whatever its slope would be.

Depth check (`--depths`; `run_depth_check`). Each depth trains at one width under the chosen rule (base depth
L0: --base-depth, default the smallest depth), under SP in depth (`--depth-mup off`: the record's model, no
depth factor) and under each `--depth-mistakes` control; the slope is of log(size) vs log(depth), judged as
above but against the rule's expected slope (`depth_expected`), +-SLOPE_TOL. What "flat" means per type:
  - `block_update`: RMS of W_t - W_0 over each block's hidden matrices (Muon), averaged over the blocks. Muon's
    update RMS is set by its LR, so the slope is the hidden LR's exponent alpha - 1: alpha = 1 (CompleteP) flat,
    every block keeps learning as much as at L0; alpha = 0.5 (sqrt) -0.5 by design (each block lazier with
    depth). SP in depth is flat here as well: this type catches a wrong LR rule, not a missing multiplier.
  - `stream`: mean |x| of the final residual stream (the last block's output, what the final norm reads).
    Flat under both alphas: a branch adds branch multiplier x update = m_L^-alpha x m_L^(alpha-1) = m_L^-1 at
    either alpha, so L blocks add O(1); the L/2 U-net skips x L0/L add (1 + L0/2) x0 at every depth. Under SP in
    depth it grows (L unscaled branches and L/2 unscaled skips add up).
  - `stream_delta`: mean |x_t - x_0| of that stream on the same input, the change since init (feature learning
    in depth): flat under both alphas for the same reason; it grows under SP in depth.
  - `logits`: z / soft-cap divisor, flat under both alphas (the readout reads the normed stream; embeddings and
    readout keep their LR). `readout` is reported only, as in the width check.
So at alpha = 1 every judged type must be flat; at alpha = 0.5 all but `block_update`, which must fall at -0.5.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from core.attention import BLOCK_SIZE
from core.config import TrainConfig, resolve_defaults
from core.data import BUILTIN_CORPORA, BatchLoader, resolve_data
from core.logger import log_summary_run
from core.model import sequence_len_ok
from core.monitor import row_abs_means
from core.depth_mup import ALPHAS, DEPTH_MISTAKES
from core.mup import MUP_MISTAKES
from core.optimizers import ORTHOGONALIZERS
from core.steps import build_model, build_optimizer_pair, forward_backward, set_schedules

LAYER_TYPES = ("embed", "attn", "mlp", "residual", "readout", "logits")
HIDDEN_TYPES = ("embed", "attn", "mlp", "residual")
DELTA_TYPES = tuple(f"{k}_delta" for k in ("embed", "residual", "logits"))  # the others start at zero: delta = size
INFO_TYPES = ("readout",)  # reported, not judged
WIDTHS = [64, 128, 256, 512]  # the width check's default widths
SLOPE_TOL = 0.15          # |slope| of log size vs log width; ~ microsoft/mup's 1.2x per 4x width: log(1.2)/log(4) = 0.13
ZERO_OK_STEPS = 2         # steps 0 and 1 may be exactly zero (zero init; zero readout -> zero hidden gradient)


class CoordRecorder:
    """Forward hooks that accumulate mean |x| per layer type, attached only while recording."""

    TYPES = LAYER_TYPES    # what `_modules` yields, plus `logits` (from the readout)
    DELTAS = DELTA_TYPES   # the `_delta` types `delta_row` computes

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows: list[dict] = []
        self._sums: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}  # kept outputs, for `_delta` types (keep=True)

    def _modules(self):
        m = self.model
        yield "embed", m.embed
        for block in m.blocks:
            if block.attn is not None:
                yield "attn", block.attn
            yield "mlp", block.mlp
            yield "residual", block
        yield "readout", m.lm_head  # z = x W^T times the muP output multiplier (the `logits` hook divides it)

    @staticmethod
    def wants(step: int, every: int, steps: int) -> bool:
        return step < steps and step % every == 0

    @contextlib.contextmanager
    def recording(self, keep: bool = False):
        """Record this forward's sizes; `keep` also keeps the outputs, for `delta_row` against another recorder.

        Sizes are reduced row chunk by row chunk (core/monitor.py `row_abs_means`): no full-size temporary.
        The readout reports z in parts through `observe` (whole, or in the chunked loss's row chunks).
        """
        self._sums = {t: [] for t in self.TYPES}
        self._outputs = {t: [] for t in self.TYPES}
        handles = []
        for kind, module in self._modules():
            if kind == "readout":
                handles.append(module.observe(self._readout_observer(keep)))
                continue

            def hook(_mod, _inp, out, kind=kind):
                self._sums[kind].append(row_abs_means(out.detach()).mean())
                if keep:
                    self._outputs[kind].append(out.detach().float())
            handles.append(module.register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _readout_observer(self, keep: bool):
        """Mean |z| of the whole readout output from its parts; `logits` is z / divisor, what enters the sigmoid."""
        divisor = self.model.softcap_divisor
        rows: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []

        def observer(z, first, last):
            if first:
                rows.clear()
                kept.clear()
            rows.append(row_abs_means(z))
            if keep:
                kept.append(z.float().reshape(-1, z.size(-1)))
            if last:
                size = torch.cat(rows).mean()
                self._sums["readout"].append(size)
                self._sums["logits"].append(size / divisor)
                if keep:
                    whole = torch.cat(kept)
                    self._outputs["readout"].append(whole)
                    self._outputs["logits"].append(whole / divisor)
        return observer

    def finish_step(self, step: int) -> dict[str, float]:
        """Average over layers and micro-batches; one read-back for all types."""
        kinds = [k for k in self.TYPES if self._sums.get(k)]
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

    def delta_row(self, init: "CoordRecorder") -> dict[str, float]:
        """Mean |x_t - x_0| per DELTAS kind: this recorder's kept outputs against `init`'s on the same input."""
        row = {}
        for kind in (d[:-len("_delta")] for d in self.DELTAS):
            mine, theirs = self._outputs.get(kind, []), init._outputs.get(kind, [])
            if mine and len(mine) == len(theirs):
                row[f"{kind}_delta"] = torch.stack([(a - b).abs().mean() for a, b in zip(mine, theirs)]).mean().item()
        self.rows[-1].update(row)
        return row

    def save(self, path: Path, **meta) -> Path:
        with open(path, "w") as f:
            for row in self.rows:
                f.write(json.dumps({**meta, **row}) + "\n")
        return path

    def wandb_metrics(self) -> dict[str, float]:
        return {f"CoordCheck/{k}_step{r['step']}": v for r in self.rows for k, v in r.items() if k != "step"}


# ---------------------------------------------------------------------------------------------
# Multi-width check


def check_config(width: int, base_width: int, use_mup: bool, seed: int, seq_len: int, depth: int, head_dim: int,
                 vocab=None, mistake: str | None = None, *, depth_mup: str = "off", base_depth: int | None = None,
                 depth_mistake: str | None = None):
    """One coordinate-check run: the CPU defaults (eager, no FP8), one packed sequence of `seq_len` tokens
    per step, a constant LR (no cooldown within the few steps), spectral norms and activation hooks off.
    `vocab` (core.data.Vocab): the data's (None: GPT-2); `mistake`: a muP negative control (core/mup.py);
    `depth_mup`, `base_depth`, `depth_mistake`: the depth rule (core/depth_mup.py)."""
    cfg = TrainConfig(width=width, depth=depth, head_dim=head_dim, seq_len=seq_len, batch_tokens=seq_len,
                      val_seq_len=seq_len, iterations=1000, cooldown_frac=0.0, seed=seed, mup=use_mup,
                      base_width=base_width if use_mup else None, spectral_every=0, activations=False,
                      vocab_size=vocab.size if vocab else None, bos_id=vocab.bos_id if vocab else None,
                      mup_mistake=mistake, depth_mup=depth_mup, base_depth=base_depth, depth_mistake=depth_mistake)
    return resolve_defaults(cfg, "cpu", env={})


class _RepeatFirstBatch:
    """Wraps a loader so that every step returns its first batch (microsoft/mup's `fix_data=True`)."""

    def __init__(self, loader):
        self._batch = loader.next_step()

    def next_step(self):
        return self._batch


def measure(widths: list[int], steps: int, seeds: list[int], *, use_mup: bool, seq_len: int = 256,
            depth: int = 4, head_dim: int = 32, fixed_batch: bool = False, orthogonalizer: str = "ns5",
            device: str = "cpu", data: str | None = None, mistake: str | None = None, log=print) -> dict:
    """{width: {seed: [ {type: size} per step ]}} for training `steps` steps at each width.

    Every width and seed sees the same batches: fresh ones each step as in training (default), or the
    first batch repeated (`fixed_batch`, the default of microsoft/mup's `_get_coord_data`).
    `orthogonalizer` "svd" swaps Muon's NS5 for the exact polar factor, to tell muP's effects from
    NS5's approximation. `data`: a built-in corpus (None: the default data; "embedded-bytes": the byte
    proxy). `mistake`: a muP negative control. The model runs eagerly (forward hooks do not fire in a
    compiled graph); a frozen copy of the initial model gives the `_delta` types on the same batches.
    """
    source = resolve_data(None, data=data)
    base = min(widths)
    out = {}
    for width in widths:
        out[width] = {}
        for seed in seeds:
            cfg = check_config(width, base, use_mup, seed, seq_len, depth, head_dim, source.vocab, mistake)
            out[width][seed] = record_run(cfg, source, steps, fixed_batch=fixed_batch, orthogonalizer=orthogonalizer,
                                          device=device)
        name = "SP " if not use_mup else (f"muP + mistake {mistake}" if mistake else "muP")
        log(f"  {name} width {width}: done ({len(seeds)} seed(s) x {steps} steps)")
    return out


def record_run(cfg, source, steps: int, *, recorder=CoordRecorder, extra=None, fixed_batch: bool = False,
               orthogonalizer: str = "ns5", device: str = "cpu") -> list[dict]:
    """Train `cfg` `steps` steps on `source`'s batches; one row {type: size} per step, recorded by `recorder`, its
    `_delta` types against a frozen copy of the initial model on the same batches. `extra(model, init_model)`
    adds entries to each row (the depth check's per-block update). Row t describes the model after t updates."""
    model = build_model(cfg, torch.device(device))
    init_model = copy.deepcopy(model).eval()
    adam, muon, _ = build_optimizer_pair(model, cfg)
    muon.orthogonalize = ORTHOGONALIZERS[orthogonalizer]
    loader = BatchLoader(source.train_files, cfg.seq_len, 1, device=device, vocab=source.vocab)
    if fixed_batch:
        loader = _RepeatFirstBatch(loader)
    rec, rec0 = recorder(model), recorder(init_model)
    for step in range(steps):
        batches = loader.next_step()
        with rec.recording(keep=True):  # eager steps: the chunked loss (core/chunked_loss.py)
            forward_backward(model, batches, 1, 1, chunked=True)
        with rec0.recording(keep=True), torch.no_grad():
            for inputs, targets in batches:
                init_model(inputs, targets, 1, chunked=True)
        rec.finish_step(step)
        rec.delta_row(rec0)
        if extra is not None:
            rec.rows[-1].update(extra(model, init_model))
        set_schedules(cfg, [adam, muon], muon, step)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    return [{k: v for k, v in r.items() if k != "step"} for r in rec.rows]


def slopes(sizes: dict, steps: int, kinds: tuple[str, ...] = LAYER_TYPES + DELTA_TYPES) -> dict[str, list[float | None]]:
    """Per layer type and step: slope of log(size) vs log(width) (or depth: the keys of `sizes`), averaged over
    seeds. None when all zero."""
    widths = sorted(sizes)
    seeds = list(sizes[widths[0]])
    result = {}
    for kind in kinds:
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


def verdict(slope_table: dict[str, list[float | None]],
            expected: dict[str, float] | None = None) -> dict[str, tuple[bool, float]]:
    """{type: (passed, worst slope)} over steps >= 1: |slope - expected slope| <= SLOPE_TOL at every step (the
    expected slope is 0, flat, unless `expected` names it: the depth check's sqrt rule), and from step
    ZERO_OK_STEPS on never exactly zero at every width (worst slope reported as nan then). INFO_TYPES pass."""
    out = {}
    for kind, per_step in slope_table.items():
        if kind.endswith("_delta") and all(s is None for s in per_step):
            continue  # not recorded (train.py --coord-check records sizes only)
        want = (expected or {}).get(kind, 0.0)
        zero_late = any(s is None for s in per_step[ZERO_OK_STEPS:])
        vals = [s for s in per_step[1:] if s is not None]
        worst = max(vals, key=lambda v: abs(v - want)) if vals else math.nan
        ok = kind in INFO_TYPES or (not zero_late and bool(vals) and abs(worst - want) <= SLOPE_TOL)
        out[kind] = (ok, math.nan if zero_late and kind not in INFO_TYPES else worst)
    return out


def _plotted_types(results: dict, kinds: tuple[str, ...] = LAYER_TYPES + DELTA_TYPES) -> list[str]:
    present = {k for sizes in results.values() for per_seed in sizes.values() for rows in per_seed.values()
               for row in rows for k in row}
    return [k for k in kinds if k in present]


def plot(results: dict, steps: int, path: Path, axis: str = "width",
         kinds: tuple[str, ...] = LAYER_TYPES + DELTA_TYPES) -> Path:
    """One panel per layer type and parametrisation: size vs width (or depth; log-log), one line per step."""
    import matplotlib  # here, not at the top: only the multi-width check plots, and matplotlib is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params = list(results)
    kinds = _plotted_types(results, kinds)
    fig, axes = plt.subplots(len(params), len(kinds), figsize=(2.6 * len(kinds), 2.5 * len(params)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for r, name in enumerate(params):
        sizes = results[name]
        widths = sorted(sizes)
        seeds = list(sizes[widths[0]])
        for c, kind in enumerate(kinds):
            ax = axes[r][c]
            plotted = []
            for step in range(steps):
                ys = [statistics.fmean(sizes[w][s][step].get(kind, 0.0) for s in seeds) for w in widths]
                if all(y > 0 for y in ys):
                    ax.plot(widths, ys, marker="o", ms=3, color=cmap(step / max(steps - 1, 1)), label=f"t={step}")
                    plotted += ys
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if plotted:  # at least a factor 4 on the y axis, so that a flat line looks flat
                lo, hi = min(plotted), max(plotted)
                mid, half = math.sqrt(lo * hi), max(math.sqrt(hi / lo), 2.0)
                ax.set_ylim(mid / half / 1.1, mid * half * 1.1)
            ax.set_title(f"{name}: {kind}", fontsize=8)
            ax.set_xlabel(axis, fontsize=7)
            if c == 0:
                ax.set_ylabel("mean |x|", fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0][-1].legend(fontsize=5, loc="best")
    fig.suptitle(f"Coordinate check: size vs {axis} (flat = {axis}-independent; _delta: change since init)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parametrisations(mistakes: list[str] | None = None) -> list[tuple[str, bool, str | None]]:
    """(name, use_mup, mistake): muP, SP, then one muP negative control per mistake."""
    return [("muP", True, None), ("SP", False, None)] + [(f"mistake:{m}", True, m) for m in (mistakes or [])]


def run_check(widths: list[int], steps: int, seeds: list[int], out_dir: Path, *, log=print,
              mistakes: list[str] | None = None, **setup) -> dict:
    """muP, SP and each negative control; writes coord_check.png and coord_check.json; returns the verdicts.

    `setup` holds measure()'s keyword arguments (seq_len, depth, head_dim, fixed_batch, orthogonalizer,
    device, data); they are saved in the JSON so that every figure says how it was made.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results, report = {}, {}
    for name, use_mup, mistake in parametrisations(mistakes):
        results[name] = measure(widths, steps, seeds, use_mup=use_mup, mistake=mistake, log=log, **setup)
        table = slopes(results[name], steps)
        report[name] = {"slopes": table, "verdict": verdict(table)}
    plot(results, steps, out_dir / "coord_check.png")
    with open(out_dir / "coord_check.json", "w") as f:
        json.dump({"widths": widths, "steps": steps, "seeds": seeds, "setup": setup, "slope_tol": SLOPE_TOL,
                   "sizes": {n: {str(w): v for w, v in r.items()} for n, r in results.items()},
                   "report": report}, f, indent=1)
    return report


def passed(verdicts: dict[str, tuple[bool, float]]) -> bool:
    return all(ok for ok, _ in verdicts.values())


def format_report(report: dict, axis: str = "width", kinds: tuple[str, ...] = LAYER_TYPES + DELTA_TYPES,
                  expected: dict[str, float] | None = None) -> str:
    kinds = [k for k in kinds if any(k in report[n]["verdict"] for n in report)]
    lines = [f"{'layer type':<15} " + "  ".join(f"{n[:22]:>22} {'':<4}" for n in report)]
    for kind in kinds:
        cells = []
        for name in report:
            ok, worst = report[name]["verdict"].get(kind, (True, math.nan))
            label = "info" if kind in INFO_TYPES else ("PASS" if ok else "FAIL")
            cells.append(f"{worst:>+22.3f} {label}" if math.isfinite(worst) else f"{'zero':>22} {label}")
        lines.append(f"{kind:<15} " + "  ".join(cells))
    for name in report:
        want = "" if expected is None else (" of its expected slope (" + (", ".join(
            f"{k} {v:+g}" for k, v in expected.items() if v) or "0 for every type") + ")")
        lines.append(f"{name}: {'PASS' if passed(report[name]['verdict']) else 'FAIL'} (worst slope of log size vs "
                     f"log {axis} over steps >= 1; every judged type must stay within +-{SLOPE_TOL}{want} and must "
                     f"not be exactly zero from step {ZERO_OK_STEPS} on; readout is reported only)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Multi-depth check (depth muP, core/depth_mup.py)

DEPTH_TYPES = ("block_update", "stream", "stream_delta", "readout", "logits")
DEPTH_RULE_CHOICES = tuple(ALPHAS)


class DepthRecorder(CoordRecorder):
    """The depth check's activations: the final residual stream (the last block's output, which the final RMS norm
    reads) and the readout/logits. `block_update` comes from the weights (`block_update`)."""

    TYPES = ("stream", "readout", "logits")
    DELTAS = ("stream_delta",)  # the logits start at zero (zero lm_head): their change since init is their size

    def _modules(self):
        yield "stream", self.model.blocks[-1]
        yield "readout", self.model.lm_head


def block_update(model, init_model) -> dict[str, float]:
    """Per-block update size: the RMS of W_t - W_0 over each block's hidden matrices (attention qkv and output,
    MLP in and out), averaged over the blocks. Absolute, not relative to W_0: the output projections start at
    zero, and the input ones get no gradient until they are nonzero (the branch is 0 at init), so a relative
    size would be exactly zero for the first steps. Muon's update has an RMS set by its LR whatever the depth,
    so the slope on log depth is the LR rule's exponent alpha - 1 (`depth_expected`)."""
    sizes = []
    with torch.no_grad():
        for block, block0 in zip(model.blocks, init_model.blocks):
            pairs = [(block.mlp.c_fc.weight, block0.mlp.c_fc.weight), (block.mlp.c_proj.weight, block0.mlp.c_proj.weight)]
            if block.attn is not None:
                pairs += [(block.attn.qkv_w, block0.attn.qkv_w), (block.attn.c_proj.weight, block0.attn.c_proj.weight)]
            sizes += [(w - w0).pow(2).mean().sqrt() for w, w0 in pairs]
    return {"block_update": torch.stack(sizes).mean().item()}


def depth_expected(rule: str) -> dict[str, float]:
    """The slope vs log depth each type must show under `rule` (0 where not named): the per-block update falls as
    m_L^(alpha-1) (0 for CompleteP; -0.5 for the sqrt rule, lazy by design), everything else is flat."""
    return {"block_update": ALPHAS[rule] - 1.0}


def measure_depths(depths: list[int], steps: int, seeds: list[int], *, rule: str, base_depth: int | None = None,
                   width: int = 64, mistake: str | None = None, seq_len: int = 256, head_dim: int = 32,
                   fixed_batch: bool = False, orthogonalizer: str = "ns5", device: str = "cpu",
                   data: str | None = None, log=print) -> dict:
    """{depth: {seed: [ {type: size} per step ]}} for training `steps` steps at each depth and one width, under
    the depth rule `rule` ("off": the standard parametrisation in depth) with base depth `base_depth` (default the
    smallest depth). Width muP is off: the width is fixed. Otherwise as `measure`."""
    source = resolve_data(None, data=data)
    base = base_depth or min(depths)
    out = {}
    for depth in depths:
        out[depth] = {}
        for seed in seeds:
            cfg = check_config(width, width, False, seed, seq_len, depth, head_dim, source.vocab, depth_mup=rule,
                               base_depth=base if rule != "off" else None, depth_mistake=mistake)
            out[depth][seed] = record_run(cfg, source, steps, recorder=DepthRecorder, extra=block_update,
                                          fixed_batch=fixed_batch, orthogonalizer=orthogonalizer, device=device)
        name = "SP in depth" if rule == "off" else (f"{rule} + mistake {mistake}" if mistake else rule)
        log(f"  {name} depth {depth}: done ({len(seeds)} seed(s) x {steps} steps)")
    return out


def depth_parametrisations(rule: str, mistakes: list[str] | None = None) -> list[tuple[str, str, str | None]]:
    """(name, depth rule, mistake): the rule, SP in depth (`off`), then one negative control per mistake."""
    return [(rule, rule, None), ("SP", "off", None)] + [(f"mistake:{m}", rule, m) for m in (mistakes or [])]


def run_depth_check(depths: list[int], steps: int, seeds: list[int], out_dir: Path, *, rule: str = "completep",
                    mistakes: list[str] | None = None, log=print, **setup) -> dict:
    """The rule, SP in depth and each depth mistake, all judged against the rule's expected slopes
    (`depth_expected`); writes depth_check.png and depth_check.json; returns the verdicts. `setup`: measure_depths'
    keyword arguments (base_depth, width, seq_len, head_dim, fixed_batch, orthogonalizer, device, data)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results, report, expected = {}, {}, depth_expected(rule)
    for name, depth_rule, mistake in depth_parametrisations(rule, mistakes):
        results[name] = measure_depths(depths, steps, seeds, rule=depth_rule, mistake=mistake, log=log, **setup)
        table = slopes(results[name], steps, DEPTH_TYPES)
        report[name] = {"slopes": table, "verdict": verdict(table, expected)}
    plot(results, steps, out_dir / "depth_check.png", axis="depth", kinds=DEPTH_TYPES)
    with open(out_dir / "depth_check.json", "w") as f:
        json.dump({"depths": depths, "steps": steps, "seeds": seeds, "rule": rule, "setup": setup,
                   "slope_tol": SLOPE_TOL, "expected": expected,
                   "sizes": {n: {str(d): v for d, v in r.items()} for n, r in results.items()},
                   "report": report}, f, indent=1)
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.coord_check",
                                description="Coordinate check of muP vs the standard parametrisation across widths.")
    axis = p.add_mutually_exclusive_group()
    axis.add_argument("--widths", type=int, nargs="+", default=None, help=f"the width check (default {WIDTHS})")
    axis.add_argument("--depths", type=int, nargs="+", default=None,
                      help="the depth check instead of the width check (depth muP, core/depth_mup.py): these depths "
                           "at one --width, judged under --depth-mup against SP in depth and each --depth-mistakes")
    p.add_argument("--width", type=int, default=64, help="the depth check's width")
    p.add_argument("--depth-mup", choices=list(DEPTH_RULE_CHOICES), default="completep", help="the depth check's rule")
    p.add_argument("--base-depth", type=int, default=None, help="the depth check's base depth (default: the smallest)")
    p.add_argument("--depth-mistakes", nargs="*", default=[], choices=sorted(DEPTH_MISTAKES), metavar="MISTAKE",
                   help=f"depth negative controls to check (each must FAIL): {', '.join(sorted(DEPTH_MISTAKES))}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds to average the slopes over")
    p.add_argument("--seq-len", type=int, default=4096,
                   help="tokens per step (one packed sequence); the first updates are only width-free with "
                        "enough tokens, see README 'Coordinate check'")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--data", choices=list(BUILTIN_CORPORA), default=None,
                   help="a built-in corpus (default: FineWeb if present, else the embedded GPT-2 corpus)")
    p.add_argument("--mistakes", nargs="*", default=[], choices=sorted(MUP_MISTAKES), metavar="MISTAKE",
                   help=f"also check these muP negative controls (each must FAIL): {', '.join(sorted(MUP_MISTAKES))}")
    p.add_argument("--fixed-batch", action="store_true",
                   help="train every step on the first batch (microsoft/mup's fix_data) instead of fresh batches")
    p.add_argument("--orthogonalizer", choices=["ns5", "svd"], default="ns5",
                   help="Muon's orthogonalisation: the record's NS5, or the exact polar factor (diagnostic)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default when available) or cpu")
    p.add_argument("--out-dir", default="logs/coord_check")
    p.add_argument("--use-wandb", choices=["auto", "true", "false"], default="auto",
                   help="log the figure and verdicts to a W&B run (auto: when an API key or WANDB_MODE is set)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.steps < 2 or a.seeds < 1:
        p.error("--steps must be >= 2 and --seeds >= 1")
    if not sequence_len_ok(a.seq_len):
        p.error(f"--seq-len {a.seq_len} must be a positive multiple of {BLOCK_SIZE} (the attention block size)")
    if a.device not in ("cpu", "cuda") or (a.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device {a.device!r}: use cpu" + ("" if torch.cuda.is_available() else " (no CUDA device here)"))
    if a.depths is not None:
        return depth_main(p, a)
    widths = sorted(set(a.widths or WIDTHS))
    if len(widths) < 2:
        p.error("--widths needs at least two widths, different ones (the check fits a slope across widths)")
    for w in widths:
        if w <= 0 or w % a.head_dim:
            p.error(f"width {w} must be a positive multiple of --head-dim {a.head_dim}")
    if a.depth_mistakes:
        p.error("--depth-mistakes are controls of the depth check: add --depths, or use --mistakes (width muP)")
    out_dir = Path(a.out_dir)
    report = run_check(widths, a.steps, list(range(a.seeds)), out_dir, seq_len=a.seq_len,
                       depth=a.depth, head_dim=a.head_dim, fixed_batch=a.fixed_batch,
                       orthogonalizer=a.orthogonalizer, device=a.device, data=a.data, mistakes=a.mistakes)
    text = format_report(report)
    print(text)
    print(f"plots: {out_dir / 'coord_check.png'}  data: {out_dir / 'coord_check.json'}")
    if a.use_wandb != "false":
        log_summary_run(project="speedrun-mup", group=out_dir.name, name=f"{out_dir.name}-coord-check",
                        images={"coord_check/figure": out_dir / "coord_check.png"},
                        summary={f"verdict/{n}": "PASS" if passed(r["verdict"]) else "FAIL" for n, r in report.items()},
                        required=a.use_wandb == "true")
    return 0 if passed(report["muP"]["verdict"]) else 1


def depth_main(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """`--depths ...`: the depth check; exit 0 iff the rule passes against its expected slopes."""
    depths = sorted(set(a.depths))
    if len(depths) < 2:
        p.error(f"--depths needs at least two different depths (the check fits a slope across depths), got {a.depths}")
    if any(d < 2 or d % 2 for d in depths):
        p.error(f"--depths must all be even and >= 2 (U-net skips pair the blocks), got {a.depths}")
    if a.mistakes:
        p.error("--mistakes are width-muP controls: with --depths use --depth-mistakes")
    if a.width <= 0 or a.width % a.head_dim:
        p.error(f"--width {a.width} must be a positive multiple of --head-dim {a.head_dim}")
    if a.base_depth is not None and (a.base_depth % 2 or not 2 <= a.base_depth <= depths[0]):
        p.error(f"--base-depth {a.base_depth} must be even and between 2 and the smallest depth {depths[0]}")
    out_dir = Path(a.out_dir)
    report = run_depth_check(depths, a.steps, list(range(a.seeds)), out_dir, rule=a.depth_mup,
                             mistakes=a.depth_mistakes, base_depth=a.base_depth, width=a.width, seq_len=a.seq_len,
                             head_dim=a.head_dim, fixed_batch=a.fixed_batch, orthogonalizer=a.orthogonalizer,
                             device=a.device, data=a.data)
    print(format_report(report, axis="depth", kinds=DEPTH_TYPES, expected=depth_expected(a.depth_mup)))
    print(f"plots: {out_dir / 'depth_check.png'}  data: {out_dir / 'depth_check.json'}")
    return 0 if passed(report[a.depth_mup]["verdict"]) else 1


if __name__ == "__main__":
    sys.exit(main())
