"""The horizon arm of the transfer lab: how far does each width's optimal LR move at 4x the tokens?

    python -m core.horizon centre docs/transfer/sweep.csv --param mup --swept adam --width 128   # the LR grid
    python -m core.horizon shift docs/transfer docs/transfer_horizon                                # the shifts

`centre` prints the LR multipliers a horizon sweep runs at one width: 5 points x2 apart centred on that
width's best grid point at the short horizon (lowest seed-mean final loss), so that the long-horizon optimum
is bracketed whichever way it moves (scripts/horizon_lab.sh).

`shift` sets the two labs' verdicts side by side. Per key (`muP/adam`, ...), width and estimator: the shift
log2(eta*_long / eta*_short), per seed (seed s of both labs: the same initialisation and data order, so the
difference pairs them), mean over seeds with a Student-t interval; and the shift's change with width
(per seed, the least-squares slope of the shift against log2 width), which is 0 when the optimum moves by
the same factor at every width. Prediction (Bjorck et al. 2024, arXiv 2409.19913, eta*(D) ~ D^-0.32): at 4x
the tokens every shift is log2(4^-0.32) = -0.64 in log2 (x0.64).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from core import transfer
from core.sweep import read_csv

GRID_POINTS = 5
PREDICTED_SHIFT_LOG2 = -0.32 * 2   # D^-0.32 at D x4


def centre_mults(rows: list[dict], param: str, swept: str, width: int) -> list[float]:
    """The horizon grid at one width: GRID_POINTS multipliers x2 apart around the best short-horizon one."""
    losses: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        if r["parametrisation"] == param and r["swept"] == swept and int(r["width"]) == width:
            loss = float(r["final_val_loss"])
            if math.isfinite(loss):
                losses[float(r["lr_mult"])].append(loss)
    if not losses:
        raise SystemExit(f"no short-horizon runs of {param}/{swept} at width {width}: run scripts/transfer_lab.sh "
                         f"first (or pass the sweep.csv that has them)")
    best = min(losses, key=lambda m: float(np.mean(losses[m])))
    half = GRID_POINTS // 2
    return [best * 2.0 ** k for k in range(-half, half + 1)]


def _per_seed_x(verdict: dict, estimator: str) -> dict[int, dict[int, float]]:
    """{width: {seed: log2 eta*}} of one key's verdict and estimator."""
    fits = verdict["estimators"][estimator]["fits"]
    return {int(w): {int(s): f["x"] for s, f in by_seed.items() if f.get("x") is not None and not f.get("flag")}
            for w, by_seed in fits.items()}


def shifts(short: dict, long: dict) -> dict:
    """Per key both labs have, per estimator: the shift per width and its slope against log2 width."""
    out = {}
    for key in sorted(set(short) & set(long)):
        per_est = {}
        for est in long[key]["estimators"]:
            xs, xl = _per_seed_x(short[key], est), _per_seed_x(long[key], est)
            widths = sorted(set(xs) & set(xl))
            by_width, seeds_all = {}, None
            for w in widths:
                seeds = sorted(set(xs[w]) & set(xl[w]))
                seeds_all = set(seeds) if seeds_all is None else seeds_all & set(seeds)
                by_width[w] = transfer.t_interval([xl[w][s] - xs[w][s] for s in seeds])
            slope = None
            if len(widths) >= 2 and seeds_all:
                lw = np.log2(widths)
                per_seed = [float(np.polyfit(lw, [xl[w][s] - xs[w][s] for w in widths], 1)[0])
                            for s in sorted(seeds_all)]
                slope = transfer.t_interval(per_seed)
            per_est[est] = {"by_width": by_width, "slope_vs_log2_width": slope}
        out[key] = {"estimators": per_est, "predicted_log2": PREDICTED_SHIFT_LOG2}
    return out


def format_shifts(result: dict) -> str:
    lines = [f"horizon shift log2(eta*_long / eta*_short) per width, mean [95% t-interval] over seeds paired by "
             f"seed; predicted {PREDICTED_SHIFT_LOG2:+.2f} (x{2 ** PREDICTED_SHIFT_LOG2:.2f}) at every width"]
    for key, r in result.items():
        lines.append(f"{key}:")
        for est, e in r["estimators"].items():
            cells = [f"w{w} {_fmt(i)}" for w, i in e["by_width"].items()]
            slope = e["slope_vs_log2_width"]
            cells.append(f"change per log2 width {_fmt(slope) if slope else 'n/a'}")
            lines.append(f"  {est:8s} " + " | ".join(cells))
    return "\n".join(lines)


def _fmt(i: dict) -> str:
    if i is None or i.get("mean") is None:
        return "n/a"
    return f"{i['mean']:+.2f} [{i['low']:+.2f}, {i['high']:+.2f}] (n={i['n']})"


def _verdicts(folder: Path) -> dict:
    rows = read_csv(folder / "sweep.csv")
    plan = json.loads((folder / "runs" / "plan.json").read_text()) if (folder / "runs" / "plan.json").exists() else {}
    return transfer.verdicts(rows, plan.get("base_width"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.horizon", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("centre", help="print the horizon LR multipliers at one width")
    c.add_argument("csv", type=Path)
    c.add_argument("--param", required=True, choices=["mup", "sp"])
    c.add_argument("--swept", required=True)
    c.add_argument("--width", required=True, type=int)
    s = sub.add_parser("shift", help="the horizon shift of every key both labs have (reads each sweep.csv)")
    s.add_argument("short", type=Path)
    s.add_argument("long", type=Path)
    s.add_argument("--out", type=Path, default=None, help="write the shifts as JSON (default: LONG/horizon_shift.json)")
    a = p.parse_args(argv)
    if a.cmd == "centre":
        mults = centre_mults(read_csv(a.csv), {"mup": "muP", "sp": "SP"}[a.param], a.swept, a.width)
        print(" ".join(f"{m:g}" for m in mults))
        return 0
    result = shifts(_verdicts(a.short), _verdicts(a.long))
    print(format_shifts(result))
    out = a.out or a.long / "horizon_shift.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"shifts: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
