"""The transfer verdict: does the optimal LR found at the base width stay optimal at every width?

    python -m core.sweep collect docs/transfer        # reads the runs (or sweep.csv), writes verdict.json, figures

This module judges rows (one per finished run: parametrisation, swept LR, width, LR, seed, final val loss,
and the data's unigram entropy and bigram cross-entropy); core/sweep.py reads them and calls `verdicts`;
core/transfer_report.py prints and draws the result. For every key (parametrisation x swept LR: `muP/adam`,
`SP/muon`, `mistake:no-readout-mult/adam`, ...):

1. **Curves**: per width and seed, the final loss against x = log2(LR). A run that diverged (non-finite loss)
   or ended at or above the unigram entropy of the validation tokens (no better than token frequencies: it
   diverged or never trained) is left out of its curve and listed under `excluded` with the rule.
2. **eta\\*** of every curve by each estimator of core/optimum.py (quad3, cubic5, cubicgcv), with its flag.
3. **Drift**, per estimator: per seed, the least-squares slope of log2 eta* against log2 width (a seed is one
   replicate of the whole sweep: the same data order at every width, so the slopes pair the widths); the
   drift is the mean over seeds with a Student-t interval (seeds - 1 degrees of freedom). 0: the optimum
   does not move with width. `core/calibration.py` shows on synthetic sweeps with this lab's noise that the
   interval covers the true drift as often as it claims (tests/test_calibration.py).
4. **Regret**, per estimator: at every width, the loss at the base width's eta* minus the loss at the width's
   own eta*, read on each seed's curve (core/optimum.loss_at); mean over seeds, t-interval, in nats.
5. **Wider is better at the transferred LR**: per seed, the loss at the base width's eta* at each width minus
   the next narrower width's; mean and t-interval.
   (A seed's curve carries ~0.016 nats of noise per point, so a per-seed regret of a few millinats cannot be
   shown small with 5 seeds; 4 and 5 are judged the other way round: they fail a key when the data show a
   regret above REGRET_TOL, or a wider width ending higher, beyond the interval.)
6. **Learned**: every width's best loss lies below the bigram cross-entropy of the data (core/baselines.py).

Judgement, per estimator: PASS when it is shown, at the interval's confidence, that the drift lies within
+-DRIFT_TOL, and it is shown neither that some width's regret exceeds REGRET_TOL nats (the interval's lower
end above it) nor that a wider width ends higher at the transferred LR (the interval above 0); FAIL when,
with enough data, the drift is not shown within the tolerance or one of the other two is shown; INCOMPLETE
when the data cannot
judge: fewer than MIN_SEEDS complete seeds, a curve with fewer than 3 finite points, or a best LR on the
grid's edge (which blocks a PASS, not a FAIL: the edge only hides a larger drift in its direction).
The key: PASS when every estimator says PASS, FAIL when every one says FAIL, otherwise INCOMPLETE naming
the estimators that disagree. A key whose base width has no runs, whose data give no bigram reference,
or whose models did not beat the bigram at some width is INCOMPLETE whatever else it shows. A seed that
has not run the key's whole width x LR grid yet (a sweep in progress) is left out and reported.

`head_to_head` sets muP against SP for each swept LR: the drift difference (paired by seed) and, at every
width, the loss at the base width's eta* under each and each one tuned per width, with intervals.
"""
from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import numpy as np
from scipy import stats

from core.optimum import ESTIMATORS, estimate, loss_at, spline_minimum

DRIFT_TOL = 0.25       # |d log2(eta*) / d log2(width)|: a quarter of a grid step per doubling of width
REGRET_TOL = 0.01      # nats: the most the base width's eta* may cost at any width (~0.5% of the lab's loss,
#                        below one run's seed-to-seed spread of 0.016); a limit that does not grow with width
CONFIDENCE = 0.95      # two-sided intervals; a PASS needs the whole interval inside its bound
MIN_SEEDS = 3          # a t-interval on 2 seeds is too wide to certify anything, and too trusting of the spread
REFERENCE_ESTIMATOR = "quad3"  # the one the tables and figures show (core/calibration.py: the best calibrated)
BLOCKING_FLAGS = ("edge", "few", "none")  # an estimate that cannot support a PASS


@lru_cache(maxsize=64)
def t_quantile(q: float, df: int) -> float:
    return float(stats.t.ppf(q, df))


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """{mean, low, high, n} of the mean of `values` (NaNs dropped): Student-t with n - 1 degrees of freedom.
    An infinite value (a loss outside the measured LRs) makes the mean and both bounds infinite, never hidden."""
    v = np.asarray([x for x in values if not math.isnan(x)], float)
    if np.isinf(v).any():
        m = float(v.sum())
        return {"mean": m, "low": m, "high": m, "n": int(v.size)}
    if v.size == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": 1}
    half = t_quantile(0.5 + confidence / 2, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": int(v.size)}


# ---------------------------------------------------------------------------------------------
# Rows -> curves


def split_partial_seeds(rows: list[dict]) -> tuple[list[dict], dict]:
    """(rows of the seeds that ran this key's whole width x LR grid, {seed: (runs, grid size)} of the others).
    A seed still in progress (or missing a failed run) would be fitted on part of its curves: it is left out."""
    grid = {(r["width"], r["lr"]) for r in rows}
    have = defaultdict(set)
    for r in rows:
        have[r["seed"]].add((r["width"], r["lr"]))
    partial = {s: (len(cells), len(grid)) for s, cells in sorted(have.items()) if cells != grid}
    return [r for r in rows if r["seed"] not in partial], partial


def _reference(rows: list[dict], column: str) -> float | None:
    """One number of the data (the same in every row of a sweep): unigram_entropy or bigram_xent."""
    values = [r[column] for r in rows if isinstance(r.get(column), float) and math.isfinite(r[column])]
    return float(np.mean(values)) if values else None


def curves(rows: list[dict], ceiling: float | None) -> tuple[dict, list[dict]]:
    """({width: {seed: (xs, ys)}} with xs = log2 LR sorted and ys NaN where a run diverged, the excluded runs).
    Diverged: a non-finite loss, or a loss at or above `ceiling` (the unigram entropy) when it is known."""
    acc = defaultdict(lambda: defaultdict(dict))
    excluded = []
    for r in rows:
        loss = r["final_val_loss"]
        rule = ("non-finite loss" if not math.isfinite(loss) else
                f"loss {loss:.4f} >= unigram entropy {ceiling:.4f}" if ceiling is not None and loss >= ceiling else "")
        if rule:
            excluded.append({"width": r["width"], "lr": r["lr"], "seed": r["seed"], "rule": rule})
            loss = math.nan
        acc[r["width"]][r["seed"]][math.log2(r["lr"])] = loss
    out = {}
    for w, seeds in acc.items():
        out[w] = {}
        for s, pts in seeds.items():
            xs = np.array(sorted(pts))
            out[w][s] = (xs, np.array([pts[x] for x in xs], float))
    return out, excluded


def mean_curve(per_seed: dict) -> tuple[np.ndarray, np.ndarray]:
    """The seed-mean curve of one width (a grid point where any seed diverged is left out: NaN)."""
    grid = sorted({x for xs, _ in per_seed.values() for x in xs})
    ys = [np.mean([ys_[list(xs_).index(x)] if x in xs_ else math.nan for xs_, ys_ in per_seed.values()])
          for x in grid]
    return np.array(grid), np.array(ys, float)


# ---------------------------------------------------------------------------------------------
# One estimator's view of one key


def judge_estimator(name: str, curve_set: dict, widths: list[int], seeds: list[int], base: int) -> dict:
    """eta* per width, drift, regret and "wider is better" under estimator `name`, and its verdict."""
    fits = {w: {s: estimate(name, *curve_set[w][s]) for s in seeds} for w in widths}
    eta = {w: _eta_summary(fits[w]) for w in widths}
    drift = _drift(fits, widths, seeds)
    x_base = eta[base]["log2_mean"]
    regret = {w: _regret(curve_set[w], seeds, x_base, eta[w]["log2_mean"]) for w in widths if w != base}
    wider = _wider(curve_set, widths, seeds, x_base)
    blocked = [f"width {w}: eta* {flag} in {n} seed(s)" for w in widths
               for flag, n in eta[w]["flags"].items() if flag in BLOCKING_FLAGS and n]
    failed = []
    if not (-DRIFT_TOL <= drift["low"] and drift["high"] <= DRIFT_TOL):  # NaN bounds: not shown either
        failed.append(f"drift interval [{drift['low']:+.3f}, {drift['high']:+.3f}] not within +-{DRIFT_TOL}")
    failed += [f"width {w}: regret {r['mean']:.4f} [{r['low']:.4f}, {r['high']:.4f}] nats, above {REGRET_TOL}"
               for w, r in regret.items() if not r["ok"]]
    failed += [f"width {p['to']} ends higher than width {p['from']} at the transferred LR: {p['mean']:+.4f} "
               f"[{p['low']:+.4f}, {p['high']:+.4f}]" for p in wider if not p["ok"]]
    if len(seeds) < MIN_SEEDS:
        blocked.insert(0, f"{len(seeds)} complete seed(s), a verdict needs >= {MIN_SEEDS}")
    verdict = ("FAIL" if failed and len(seeds) >= MIN_SEEDS else "INCOMPLETE" if blocked or failed else "PASS")
    return {"verdict": verdict, "reasons": failed if verdict == "FAIL" else blocked + failed,
            "eta_star": {str(w): eta[w] for w in widths}, "drift": drift,
            "regret": {str(w): r for w, r in regret.items()}, "wider_is_better": wider,
            "fits": {str(w): {str(s): fits[w][s]._asdict() for s in seeds} for w in widths}}


def _eta_summary(fits: dict) -> dict:
    """Mean log2 eta* over seeds with its t-interval, in LR too, and how many seeds carry each flag."""
    iv = t_interval([f.x for f in fits.values()])
    flags = {flag: sum(f.flag == flag for f in fits.values()) for flag in ("edge", "few", "none", "clipped",
                                                                          "concave")}
    out = {"log2_mean": iv["mean"], "log2_low": iv["low"], "log2_high": iv["high"], "seeds": iv["n"],
           "flags": {k: n for k, n in flags.items() if n}}
    for k in ("mean", "low", "high"):
        out[k] = 2.0 ** out[f"log2_{k}"] if math.isfinite(out[f"log2_{k}"]) else math.nan
    return out


def _drift(fits: dict, widths: list[int], seeds: list[int]) -> dict:
    """Per seed the slope of log2 eta* on log2 width; their mean with a t-interval. A seed without a finite
    eta* at some width has no slope (left out, counted in `seeds`)."""
    log_w = np.log2(np.array(widths, float))
    per_seed = {}
    for s in seeds:
        xs = np.array([fits[w][s].x for w in widths])
        if len(widths) >= 2 and np.isfinite(xs).all():
            per_seed[str(s)] = float(np.polyfit(log_w, xs, 1)[0])
    iv = t_interval(per_seed.values())
    return {"slope": iv["mean"], "low": iv["low"], "high": iv["high"], "seeds": iv["n"], "per_seed": per_seed}


def _regret(per_seed: dict, seeds: list[int], x_base: float, x_own: float) -> dict:
    """On each seed's curve: loss at the base width's eta* minus loss at this width's own; t-interval; ok unless
    the interval's lower end is above REGRET_TOL (a regret shown too large)."""
    iv = t_interval([_difference(loss_at(*per_seed[s], x_base), loss_at(*per_seed[s], x_own)) for s in seeds])
    return {**iv, "limit": REGRET_TOL, "ok": bool(iv["low"] <= REGRET_TOL)}


def _wider(curve_set: dict, widths: list[int], seeds: list[int], x_base: float) -> list[dict]:
    """Each step to the next wider width at the base width's eta*: per-seed loss difference (wider - narrower),
    mean and t-interval; ok unless the interval lies above 0 (wider shown worse); `shown` when it lies below."""
    out = []
    for narrow, wide in zip(widths, widths[1:]):
        iv = t_interval([_difference(loss_at(*curve_set[wide][s], x_base), loss_at(*curve_set[narrow][s], x_base))
                         for s in seeds])
        out.append({"from": narrow, "to": wide, "lr": 2.0 ** x_base if math.isfinite(x_base) else math.nan,
                    **iv, "ok": not iv["low"] > 0, "shown": bool(iv["high"] < 0)})
    return out


def _difference(a: float, b: float) -> float:
    """a - b, where an unknown loss (inf: outside the measured LRs) on either side makes it inf, never NaN."""
    return a - b if math.isfinite(a) and math.isfinite(b) else math.inf


# ---------------------------------------------------------------------------------------------
# One key


def analyse(rows: list[dict], base_width: int | None = None) -> dict:
    """The verdict of one parametrisation x swept LR (rows of one key). See the module docstring."""
    complete, partial = split_partial_seeds(rows)
    judged = complete or rows  # no seed complete yet: judge what there is, but never PASS or FAIL on it
    ceiling = _reference(judged, "unigram_entropy")
    curve_set, excluded = curves(judged, ceiling)
    widths = sorted(curve_set)
    seeds = sorted({s for w in widths for s in curve_set[w]})
    gates = []
    base = base_width
    if base is None:
        base = widths[0]
    elif base not in curve_set:
        gates.append(f"the base width {base} has no runs in this key (widths {widths})")
        base = widths[0]
    if len(widths) < 2:
        gates.append("fewer than 2 widths")
    if not complete:
        gates.append("no seed has run the whole width x LR grid yet")
    per_est = {name: judge_estimator(name, curve_set, widths, seeds, base) for name in ESTIMATORS}
    best = {w: _best_loss(curve_set[w]) for w in widths}
    learned = _learned(judged, best)
    if not learned["ok"]:
        gates.insert(0, learned["reason"])
    verdict, reasons = _combine(per_est, gates)
    ref = per_est[REFERENCE_ESTIMATOR]
    return {"verdict": verdict, "reasons": reasons, "widths": widths, "seeds": seeds if complete else [],
            "base_width": base, "base_width_given": base_width is not None,
            "in_progress": {str(s): {"runs": n, "grid": m} for s, (n, m) in partial.items()},
            "excluded": excluded, "unigram_entropy": ceiling, "learned": learned,
            "best_loss": {str(w): best[w] for w in widths},
            "estimators": per_est, "reference_estimator": REFERENCE_ESTIMATOR,
            "eta_star": ref["eta_star"], "drift": ref["drift"],
            "drift_by_estimator": {n: per_est[n]["drift"] for n in ESTIMATORS},
            "thresholds": thresholds()}


def thresholds() -> dict:
    return {"drift_tol": DRIFT_TOL, "regret_tol_nats": REGRET_TOL, "confidence": CONFIDENCE,
            "interval": "Student-t over per-seed values, seeds - 1 degrees of freedom", "min_seeds": MIN_SEEDS,
            "estimators": list(ESTIMATORS), "learned_gate": "best loss below the bigram cross-entropy"}


def _combine(per_est: dict, gates: list[str]) -> tuple[str, list[str]]:
    """The key's verdict from its estimators' and its own gates (see the module docstring)."""
    verdicts = {n: v["verdict"] for n, v in per_est.items()}
    if gates:
        return "INCOMPLETE", gates
    if len(set(verdicts.values())) == 1:
        (verdict,) = set(verdicts.values())
        return verdict, [f"{n}: {r}" for n, v in per_est.items() for r in v["reasons"]]
    split = ", ".join(f"{n} {v}" for n, v in verdicts.items())
    return "INCOMPLETE", [f"the estimators disagree ({split})"] + \
        [f"{n}: {r}" for n, v in per_est.items() if v["verdict"] != "PASS" for r in v["reasons"]]


def _best_loss(per_seed: dict) -> float:
    """The lowest loss of the seed-mean curve (its spline's minimum; the best grid point at an edge)."""
    return spline_minimum(*mean_curve(per_seed)).loss


def _learned(rows: list[dict], best_loss: dict) -> dict:
    """Did every width learn more than pairs of tokens? Never silently off: no bigram reference -> not ok."""
    bigram = _reference(rows, "bigram_xent")
    if bigram is None:
        return {"ok": False, "bigram_xent": None, "not_below": {},
                "reason": "no bigram reference (bigram_xent) in the rows: collect from the run folders, which "
                          "computes it from the runs' data (core/baselines.py), or add the column to sweep.csv"}
    not_below = {str(w): loss for w, loss in best_loss.items() if not loss < bigram}
    reason = ("the models have not learned beyond token pairs: best loss "
              + ", ".join(f"{loss:.3f} (w{w})" for w, loss in not_below.items())
              + f" not below the bigram cross-entropy {bigram:.3f}; train longer") if not_below else ""
    return {"ok": not not_below, "bigram_xent": bigram, "not_below": not_below, "reason": reason}


# ---------------------------------------------------------------------------------------------
# All keys, and muP against SP


def verdicts(rows: list[dict], base_width: int | None = None) -> dict:
    """{"<param>/<swept>": analyse(...)} over the finished (or diverged) runs of a sweep; each muP key that has
    an SP twin also gets `vs_SP` (head_to_head)."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("status", "done") != "failed":
            groups[f"{r['parametrisation']}/{r['swept']}"].append(r)
    result = {key: analyse(groups[key], base_width) for key in sorted(groups, key=_reading_order)}
    for key in result:
        param, swept = key.rsplit("/", 1)
        if param == "muP" and f"SP/{swept}" in result:
            result[key]["vs_SP"] = head_to_head(groups[key], groups[f"SP/{swept}"], result[key],
                                                result[f"SP/{swept}"])
    return result


def head_to_head(mup_rows: list[dict], sp_rows: list[dict], mup: dict, sp: dict) -> dict:
    """muP against SP on one swept LR, per estimator, paired by seed: the drift difference, and at every width
    the loss at the base width's eta* and at the width's own eta* under each, with their differences."""
    seeds = sorted(set(mup["seeds"]) & set(sp["seeds"]))
    c_mup = curves(split_partial_seeds(mup_rows)[0], mup["unigram_entropy"])[0]
    c_sp = curves(split_partial_seeds(sp_rows)[0], sp["unigram_entropy"])[0]
    widths = [w for w in mup["widths"] if w in sp["widths"]]
    out = {"seeds": seeds, "estimators": {}}
    for name in ESTIMATORS:
        em, es = mup["estimators"][name], sp["estimators"][name]
        d_m, d_s = em["drift"]["per_seed"], es["drift"]["per_seed"]
        diff = t_interval([d_m[str(s)] - d_s[str(s)] for s in seeds if str(s) in d_m and str(s) in d_s])
        table = {}
        for w in widths:
            at = {}
            for label, cs, e, x_key in (("muP_at_base", c_mup, em, mup["base_width"]),
                                        ("SP_at_base", c_sp, es, sp["base_width"]),
                                        ("muP_tuned", c_mup, em, w), ("SP_tuned", c_sp, es, w)):
                x = e["eta_star"][str(x_key)]["log2_mean"]
                at[label] = [loss_at(*cs[w][s], x) for s in seeds]
            table[str(w)] = {k: t_interval(v) for k, v in at.items()}
            for a, b in (("muP_at_base", "SP_tuned"), ("muP_at_base", "SP_at_base"), ("muP_tuned", "SP_tuned")):
                table[str(w)][f"{a}_minus_{b}"] = t_interval([_difference(u, v) for u, v in zip(at[a], at[b])])
        out["estimators"][name] = {"drift_diff": diff, "widths": table}
    return out


def _reading_order(key: str) -> tuple:
    """muP first, then SP, then the mistakes; Adam before Muon: the order of the figure's panels and the tables."""
    param, swept = key.rsplit("/", 1)
    return {"muP": 0, "SP": 1}.get(param, 2), swept, param
