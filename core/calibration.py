"""Does the transfer verdict cover what it claims? Synthetic sweeps with the lab's own grid, curves and noise.

    python -m core.calibration docs/transfer/sweep.csv            # 500 sweeps per true drift, 5 seeds
    python -m core.calibration docs/transfer/sweep.csv --seeds 3 --sweeps 1000 --key muP/muon

An interval or a threshold is a claim: "95%" must contain the true drift 95% of the time, and a verdict at a
true drift equal to its tolerance must PASS rarely. Both can only be checked where the truth is known, so
this module builds sweeps whose truth is known and whose everything else is the lab's:

* **The grid**: the widths, LR grid and base width of the key's rows (`--key`, default muP/adam).
* **The curves**: per width, a quartic in u = log2 LR - x* with no linear term, c + a u^2 + b u^3 + e u^4,
  fitted to the key's seed-mean curve (least squares over x*), so the truth has that width's depth, width
  and asymmetry and its minimum exactly at x*. The minimum is then moved to x*(w) = x0 + drift log2(w/w0),
  with x0 drawn uniformly within half a grid step of the base width's fitted optimum, so the optimum's
  place between grid points varies from sweep to sweep.
* **The noise**: each synthetic seed adds the deviations of one real seed from its key's seed mean, at
  every width at once (drawn without replacement over the muP and SP keys' seeds, with a random sign, and
  scaled by sqrt(n / (n - 1)) to an unbiased spread), so its size (median |deviation| ~0.01 nats), its growth at high LR, its
  correlation along a curve and across widths (a seed shares its data order at every width) are the lab's.

Each synthetic sweep goes through `core.transfer.analyse`, the code that judges the real one. Printed: each
estimator's coverage of the true drift, and the PASS rate of the verdict (all estimators, every criterion) at
each true drift. tests/test_calibration.py asserts the rates on the committed sweep.csv.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from core import transfer
from core.optimum import ESTIMATORS

NOISE_KEYS = ("muP/adam", "SP/adam", "muP/muon", "SP/muon")  # whose seeds' deviations make the noise pool
DRIFTS = (-0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5)


# ---------------------------------------------------------------------------------------------
# What the lab's rows give: grid, curve shapes, noise


def _by_key(rows: list[dict]) -> dict:
    """{key: {width: {seed: {log2 lr: loss}}}} of the complete seeds of each key."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    groups = defaultdict(list)
    for r in rows:
        if r.get("status", "done") != "failed":
            groups[f"{r['parametrisation']}/{r['swept']}"].append(r)
    for key, key_rows in groups.items():
        for r in transfer.split_partial_seeds(key_rows)[0]:
            out[key][r["width"]][r["seed"]][math.log2(r["lr"])] = r["final_val_loss"]
    return out


def fit_shape(xs: np.ndarray, ys: np.ndarray) -> dict:
    """The quartic c + a u^2 + b u^3 + e u^4 (u = x - x_star) nearest the curve, with its minimum at x_star:
    {x_star, coeffs (c, a, b, e)}. x_star is searched on a 0.01 grid within a grid step of the best point;
    candidates whose quartic has a lower point than u = 0 within the grid's range are skipped."""
    ok = np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    best = xs[np.argmin(ys)]
    span = np.linspace(xs.min() - 1, xs.max() + 1, 401)
    choice = None
    for x_star in np.arange(best - 1, best + 1.0001, 0.01):
        u = xs - x_star
        design = np.stack([np.ones_like(u), u ** 2, u ** 3, u ** 4], axis=1)
        coeffs, *_ = np.linalg.lstsq(design, ys, rcond=None)
        v = span - x_star
        if (coeffs[1] * v ** 2 + coeffs[2] * v ** 3 + coeffs[3] * v ** 4 < -1e-12).any():
            continue  # not its minimum
        sse = float(((design @ coeffs - ys) ** 2).sum())
        if choice is None or sse < choice[0]:
            choice = (sse, float(x_star), coeffs)
    if choice is None:
        raise ValueError("no quartic with its minimum inside the grid fits this curve")
    return {"x_star": choice[1], "coeffs": tuple(float(c) for c in choice[2]), "sse": choice[0]}


def noise_pool(by_key: dict, widths: list[int], grid: np.ndarray) -> list[dict]:
    """One entry per real (key, seed): {width: deviation from the key's seed mean, by grid position}, unbiased
    scale. Keys whose LR grid has another place (the Muon sweep's LRs) enter by position along their own grid,
    which has the same points and spacing: both grids are centred on the record's LR, which sits within a
    grid step of every width's optimum, so a position means the same distance from the optimum in each."""
    pool = []
    steps = np.diff(grid)
    for key in NOISE_KEYS:
        curves = by_key.get(key)
        if not curves or any(w not in curves for w in widths):
            continue
        seeds = sorted(set.intersection(*(set(curves[w]) for w in widths)))
        own = sorted(curves[widths[0]][seeds[0]]) if seeds else []
        if len(seeds) < 2 or len(own) != len(grid) or not np.allclose(np.diff(own), steps):
            continue
        if any(sorted(curves[w][s]) != own for w in widths for s in seeds):
            continue
        scale = math.sqrt(len(seeds) / (len(seeds) - 1))
        for s in seeds:
            entry = {}
            for w in widths:
                ys = np.array([[curves[w][t][x] for x in own] for t in seeds])
                entry[w] = scale * (ys[seeds.index(s)] - np.nanmean(ys, axis=0))
            if all(np.isfinite(v).all() for v in entry.values()):
                pool.append(entry)
    if not pool:
        raise ValueError(f"no complete seeds of {NOISE_KEYS} on one grid: nothing to take the noise from")
    return pool


class Lab:
    """The grid, truth shapes and noise pool of one key of a real sweep, and synthetic sweeps built from them."""

    def __init__(self, rows: list[dict], key: str = "muP/adam", base_width: int | None = None):
        by_key = _by_key(rows)
        if key not in by_key:
            raise ValueError(f"key {key!r} has no complete seeds in these rows (keys: {sorted(by_key)})")
        curves = by_key[key]
        self.key, self.widths = key, sorted(curves)
        self.base = base_width or self.widths[0]
        self.grid = np.array(sorted(next(iter(curves[self.base].values()))))
        self.shapes = {}
        for w in self.widths:
            ys = np.array([[curves[w][s].get(x, math.nan) for x in self.grid] for s in curves[w]])
            self.shapes[w] = fit_shape(self.grid, np.nanmean(ys, axis=0))
        self.pool = noise_pool(by_key, self.widths, self.grid)
        self.median_abs_noise = float(np.median(np.abs(np.concatenate([v for e in self.pool for v in e.values()]))))
        self.references = {c: transfer._reference(rows, c) for c in ("unigram_entropy", "bigram_xent")}

    def truth(self, width: int, x: np.ndarray, x_star: float) -> np.ndarray:
        c, a, b, e = self.shapes[width]["coeffs"]
        u = x - x_star
        return c + a * u ** 2 + b * u ** 3 + e * u ** 4

    def sweep(self, drift: float, seeds: int, rng: np.random.Generator) -> list[dict]:
        """The rows of one synthetic sweep with a known drift (the key's widths and grid, `seeds` seeds)."""
        x0 = self.shapes[self.base]["x_star"] + rng.uniform(-0.5, 0.5)
        if seeds > len(self.pool):
            raise ValueError(f"{seeds} synthetic seeds need as many real seeds' deviations, the pool has "
                             f"{len(self.pool)}: a seed drawn twice would make two seeds agree")
        draws = rng.choice(len(self.pool), size=seeds, replace=False)
        signs = rng.choice((-1.0, 1.0), size=seeds)  # seed noise is as likely to go either way
        param, swept = self.key.rsplit("/", 1)
        rows = []
        for w in self.widths:
            clean = self.truth(w, self.grid, x0 + drift * math.log2(w / self.base))
            for s in range(seeds):
                ys = clean + signs[s] * self.pool[draws[s]][w]
                rows += [{"parametrisation": param, "swept": swept, "width": w, "lr": 2.0 ** x, "seed": s + 1,
                          "final_val_loss": float(y), "status": "done", **self.references}
                         for x, y in zip(self.grid, ys)]
        return rows


# ---------------------------------------------------------------------------------------------
# Coverage and PASS rates


def simulate(lab: Lab, drifts=DRIFTS, sweeps: int = 500, seeds: int = 5, rng_seed: int = 0) -> dict:
    """{drift: {"pass": rate, "fail": rate, "coverage": {estimator: rate}, "drift_pass": {estimator: rate}}}."""
    rng = np.random.default_rng(rng_seed)
    out = {}
    for d in drifts:
        cover = {n: 0 for n in ESTIMATORS}
        drift_pass = {n: 0 for n in ESTIMATORS}
        verdicts = defaultdict(int)
        for _ in range(sweeps):
            v = transfer.analyse(lab.sweep(d, seeds, rng), lab.base)
            verdicts[v["verdict"]] += 1
            for n in ESTIMATORS:
                dd = v["estimators"][n]["drift"]
                cover[n] += bool(dd["low"] <= d <= dd["high"])
                drift_pass[n] += bool(-transfer.DRIFT_TOL <= dd["low"] and dd["high"] <= transfer.DRIFT_TOL)
        out[d] = {"pass": verdicts["PASS"] / sweeps, "fail": verdicts["FAIL"] / sweeps,
                  "coverage": {n: c / sweeps for n, c in cover.items()},
                  "drift_pass": {n: c / sweeps for n, c in drift_pass.items()}}
    return out


def table(lab: Lab, result: dict, sweeps: int, seeds: int) -> str:
    lines = [f"calibration of the transfer verdict on {lab.key}'s grid (widths {lab.widths}, base {lab.base}, "
             f"{len(lab.grid)} LRs), {seeds} seeds, {sweeps} synthetic sweeps per true drift; noise: {len(lab.pool)} "
             f"real seeds' deviations (median |dev| {lab.median_abs_noise:.4f} nats); "
             f"{transfer.CONFIDENCE:.0%} Student-t intervals, tolerance +-{transfer.DRIFT_TOL}",
             f"{'true drift':>10}  {'PASS':>6}  {'FAIL':>6}  "
             + "  ".join(f"{'cover ' + n:>13}" for n in ESTIMATORS) + "  "
             + "  ".join(f"{'drift ok ' + n:>15}" for n in ESTIMATORS)]
    for d, r in result.items():
        lines.append(f"{d:>+10.3f}  {r['pass']:>6.1%}  {r['fail']:>6.1%}  "
                     + "  ".join(f"{r['coverage'][n]:>13.1%}" for n in ESTIMATORS) + "  "
                     + "  ".join(f"{r['drift_pass'][n]:>15.1%}" for n in ESTIMATORS))
    return "\n".join(lines)


def main(argv=None) -> int:
    from core.sweep import read_csv
    p = argparse.ArgumentParser(prog="python -m core.calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path)
    p.add_argument("--key", default="muP/adam", help="whose grid and curve shapes (the noise: all muP/SP keys)")
    p.add_argument("--sweeps", type=int, default=500)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--drifts", type=float, nargs="+", default=list(DRIFTS))
    a = p.parse_args(argv)
    lab = Lab(read_csv(a.csv), a.key)
    print(table(lab, simulate(lab, a.drifts, a.sweeps, a.seeds), a.sweeps, a.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
