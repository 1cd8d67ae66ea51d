"""Width x LR sweeps: collect the runs of scripts/run_mup_width_group_scaling.sh into a CSV, draw the
muP transfer figure and report each width's optimal learning rate.

    python -m core.sweep collect logs/sweep_X --base-width 64   # sweep.csv, sweep.png, optimum table
    python -m core.sweep lr adam 0.5                            # 0.5 x the record's Adam LR (used by the script)
    python -m core.sweep check-widths 64 128 256                # validate widths before a sweep starts

Each run folder holds config.json (width, mup, LRs, seed) and the step lines in console.log; the final
validation loss is read with the same step-line parser the console uses (core/logger.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from core.config import TrainConfig

DEFAULT_LR = {"adam": TrainConfig.adam_lr, "muon": TrainConfig.muon_lr}
FIELDS = ["parametrisation", "swept", "width", "lr", "lr_mult", "seed", "final_val_loss", "steps", "run"]


def final_val_loss(run_dir: Path) -> tuple[float, int] | None:
    """(val loss, step) of the last validation step line in the run's console log, None if it has none."""
    from core.logger import parse_step_line
    last = None
    log = run_dir / "console.log"
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        parsed = parse_step_line(line)
        if parsed and parsed.get("val_loss") is not None:
            last = (parsed["val_loss"], parsed["step"])
    return last


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for cfg_path in sorted(sweep_dir.glob("*/config.json")):
        cfg = json.loads(cfg_path.read_text())
        found = final_val_loss(cfg_path.parent)
        if found is None:
            continue
        swept = "muon" if cfg["muon_lr"] != DEFAULT_LR["muon"] else "adam"
        name = cfg_path.parent.name
        if "_muon_" in name:
            swept = "muon"
        elif "_adam_" in name:
            swept = "adam"
        lr = cfg[f"{swept}_lr"]
        loss, step = found
        rows.append({"parametrisation": "muP" if cfg["mup"] else "SP", "swept": swept, "width": cfg["width"],
                     "lr": lr, "lr_mult": lr / DEFAULT_LR[swept], "seed": cfg["seed"],
                     "final_val_loss": loss if math.isfinite(loss) else float("nan"), "steps": step, "run": name})
    return rows


def optima(rows: list[dict]) -> dict[tuple[str, str], dict[int, tuple[float, float]]]:
    """{(param, swept): {width: (best lr, its loss)}}, averaging seeds; non-finite losses never win."""
    acc = defaultdict(list)
    for r in rows:
        acc[(r["parametrisation"], r["swept"], r["width"], r["lr"])].append(r["final_val_loss"])
    best = defaultdict(dict)
    for (param, swept, width, lr), losses in acc.items():
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss):
            continue
        cur = best[(param, swept)].get(width)
        if cur is None or loss < cur[1]:
            best[(param, swept)][width] = (lr, loss)
    return best


def transfer_report(rows: list[dict], base_width: int | None) -> str:
    lines = []
    for (param, swept), per_width in sorted(optima(rows).items()):
        widths = sorted(per_width)
        base = base_width if base_width in per_width else widths[0]
        base_lr = per_width[base][0]
        lines.append(f"{param} / {swept} LR: optimum per width (base {base}: lr {base_lr:g})")
        for w in widths:
            lr, loss = per_width[w]
            steps = math.log2(lr / base_lr)
            ok = abs(steps) <= 1.0 + 1e-9
            lines.append(f"  width {w:>5}: best lr {lr:<10.4g} val_loss {loss:.4f}  "
                         f"{steps:+.0f} grid step(s) from base  {'within 1 step' if ok else 'SHIFTED'}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    swepts = sorted({r["swept"] for r in rows})
    params = [p for p in ("muP", "SP") if any(r["parametrisation"] == p for r in rows)]
    fig, axes = plt.subplots(len(swepts), len(params), figsize=(5.2 * len(params), 3.8 * len(swepts)),
                             squeeze=False, sharey="row")
    cmap = plt.get_cmap("plasma")
    widths_all = sorted({r["width"] for r in rows})
    for i, swept in enumerate(swepts):
        for j, param in enumerate(params):
            ax = axes[i][j]
            for k, width in enumerate(widths_all):
                pts = defaultdict(list)
                for r in rows:
                    if r["swept"] == swept and r["parametrisation"] == param and r["width"] == width:
                        pts[r["lr"]].append(r["final_val_loss"])
                if not pts:
                    continue
                lrs = sorted(pts)
                losses = [sum(pts[lr]) / len(pts[lr]) for lr in lrs]
                color = cmap(k / max(len(widths_all) - 1, 1) * 0.85)
                ax.plot(lrs, losses, marker="o", color=color, label=f"width {width}")
                finite = [(lr, l) for lr, l in zip(lrs, losses) if math.isfinite(l)]
                if finite:
                    lr_best, l_best = min(finite, key=lambda t: t[1])
                    ax.plot([lr_best], [l_best], marker="*", ms=13, color=color, markeredgecolor="k")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{param}: sweep of the {swept} LR", fontsize=10)
            ax.set_xlabel(f"{swept} learning rate")
            if j == 0:
                ax.set_ylabel("final validation loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("muP transfer: validation loss vs learning rate, one curve per width (star = optimum)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["parametrisation"], r["swept"], r["width"], r["lr"], r["seed"])):
            w.writerow(r)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.sweep")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("sweep_dir")
    c.add_argument("--base-width", type=int, default=None)
    l = sub.add_parser("lr")
    l.add_argument("which", choices=sorted(DEFAULT_LR))
    l.add_argument("mult", type=float)
    w = sub.add_parser("check-widths")
    w.add_argument("widths", nargs="*")
    a, rest = p.parse_known_args(argv)
    if a.cmd == "lr":
        print(f"{DEFAULT_LR[a.which] * a.mult:.6g}")
        return 0
    if a.cmd == "check-widths":
        from core.config import ConfigError, parse_args, resolve_defaults, validate
        import torch
        if not a.widths:
            print("error: the width list is empty: give the base width and at least one target width",
                  file=sys.stderr)
            return 2
        for width in a.widths:
            try:
                cfg = parse_args(["--width", width, *rest])
                validate(resolve_defaults(cfg, "cuda" if torch.cuda.is_available() else "cpu", env={}))
            except (ConfigError, SystemExit) as e:
                print(f"error: width {width!r}: {e}", file=sys.stderr)
                return 2
        return 0
    sweep_dir = Path(a.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: {sweep_dir} is not a folder of sweep runs", file=sys.stderr)
        return 2
    rows = collect(sweep_dir)
    if not rows:
        print(f"error: no finished runs (config.json + a val_loss step line) under {sweep_dir}", file=sys.stderr)
        return 1
    csv_path = write_csv(rows, sweep_dir / "sweep.csv")
    png = plot(rows, sweep_dir / "sweep.png")
    print(transfer_report(rows, a.base_width))
    print(f"csv: {csv_path}\nfigure: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
