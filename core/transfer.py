"""The transfer verdict: does the optimal LR found at the base width stay optimal at every width?

    python -m core.sweep collect docs/transfer          # reads docs/transfer/sweep.csv (or run folders)

This module judges rows; core/sweep.py reads them from the runs and calls it (`main_collect`).

For every parametrisation and swept LR (`muP/adam`, `SP/muon`, `mistake:no-readout-mult/adam`, ...):

1. eta* per width and seed: the loss against x = log2(LR) near the best grid point, fitted by a quadratic
   through the nearest FIT_POINTS points (3-5, fewer at the grid's edge or next to diverged runs); its
   minimum, kept inside the fitted points (an optimum on the grid's edge is flagged, not extrapolated).
   A concave or flat fit falls back to the best grid point.
2. Over seeds: the mean of log2 eta* per width, with a bootstrap interval (seeds resampled).
3. Drift: the least-squares slope of mean log2 eta* against log2 width, with a bootstrap interval
   (seeds resampled independently per width). 0 means the optimum does not move with width.
4. Regret: at every width, the loss (seed-mean curve) at the base width's eta* minus the loss at that
   width's own eta*; set against the gain, the loss the base width's optimum gives up against the
   wider model's optimum.
5. Wider is better: at every grid LR within 2x of the base optimum, the seed-mean loss falls with width.

6. Learned: at every width the best loss lies below LEARNED_FRACTION x the unigram entropy of the validation
   tokens (when the runs report it). Models that only learned token frequencies say nothing about transfer
   (Tensor Programs V, sec. 6.1: transfer needs a minimum scale), so such a sweep is INCOMPLETE, never PASS or FAIL.

PASS when the drift interval lies within +-DRIFT_TOL and at no width the regret exceeds REGRET_FRACTION of
the gain. Both thresholds are printed with the numbers and written to verdict.json. A sweep that cannot
certify a PASS yet (fewer than MIN_SEEDS seeds at a width, fewer than 3 finite LR points, or a best LR on
the grid's edge) is INCOMPLETE, unless what it has already fails. A seed that has not run the key's whole
width x LR grid yet (a sweep in progress) is left out of the verdict and reported as in progress.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from core.logger import log_summary_run

DRIFT_TOL = 0.25          # |d log2(eta*) / d log2(width)|: a quarter of a grid step per doubling of width
REGRET_FRACTION = 1 / 3   # the regret of the base width's eta* may cost at most a third of the width gain
FIT_POINTS = 5            # grid points in the quadratic fit around the best one (>= 3)
BOOTSTRAP = 2000          # resamples for the intervals (a fixed RNG seed: the verdict is reproducible)
MIN_SEEDS = 2             # an interval over seeds needs at least two; fewer: INCOMPLETE, never PASS
INTERVAL = (2.5, 97.5)    # percentiles: a 95% bootstrap interval
LEARNED_FRACTION = 0.75   # every width's best loss below this fraction of the unigram entropy, or INCOMPLETE


# ---------------------------------------------------------------------------------------------
# One loss curve


def fit_window(xs: np.ndarray, ys: np.ndarray, points: int = FIT_POINTS) -> np.ndarray:
    """Indices of the finite grid points nearest the best one (up to `points`, contiguous in the finite ones)."""
    finite = np.flatnonzero(np.isfinite(ys))
    if finite.size == 0:
        return finite
    best = finite[np.argmin(ys[finite])]
    order = sorted(finite, key=lambda i: (abs(xs[i] - xs[best]), xs[i]))
    return np.array(sorted(order[:points]))


def optimum(xs, ys, points: int = FIT_POINTS) -> dict:
    """{x_star, loss_star, edge, coeffs, window} of one curve (x = log2 LR, y = loss)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    idx = fit_window(xs, ys, points)
    if idx.size == 0:
        return {"x_star": math.nan, "loss_star": math.nan, "edge": True, "coeffs": None, "window": []}
    best = idx[np.argmin(ys[idx])]
    lo, hi = xs[idx].min(), xs[idx].max()
    finite_x = xs[np.isfinite(ys)]
    edge = bool(xs[best] == finite_x.min() or xs[best] == finite_x.max())
    coeffs = None
    x_star, y_star = xs[best], ys[best]
    if idx.size >= 3:
        a, b, c = np.polyfit(xs[idx], ys[idx], 2)
        if a > 0:
            x_star = float(np.clip(-b / (2 * a), lo, hi))
            y_star = float(np.polyval((a, b, c), x_star))
            coeffs = (float(a), float(b), float(c))
    return {"x_star": float(x_star), "loss_star": float(y_star), "edge": edge, "coeffs": coeffs,
            "window": [float(xs[idx].min()), float(xs[idx].max())]}


def loss_at(xs, ys, fit: dict, x: float) -> float:
    """The curve's loss at x: the quadratic inside its fitted window, linear between grid points outside it."""
    if fit["coeffs"] is not None and fit["window"][0] <= x <= fit["window"][1]:
        return float(np.polyval(fit["coeffs"], x))
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    ok = np.isfinite(ys)
    if not ok.any() or x < xs[ok].min() or x > xs[ok].max():
        return math.inf  # outside the measured range: unknown, treated as no better than divergence
    return float(np.interp(x, xs[ok], ys[ok]))


# ---------------------------------------------------------------------------------------------
# One parametrisation x swept LR


def _curves(rows: list[dict]) -> dict:
    """{width: {seed: (xs, ys)}} with xs = log2 LR sorted; a diverged run has loss NaN."""
    acc = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        acc[r["width"]][r["seed"]][math.log2(r["lr"])] = r["final_val_loss"]
    out = {}
    for w, seeds in acc.items():
        out[w] = {}
        for s, pts in seeds.items():
            xs = np.array(sorted(pts))
            out[w][s] = (xs, np.array([pts[x] for x in xs], float))
    return out


def _slope(log_w: np.ndarray, x_star: np.ndarray) -> float:
    return float(np.polyfit(log_w, x_star, 1)[0])


def _eta_star(per_seed: dict, widths: list[int], rng) -> tuple[dict, dict]:
    """Per width: the seed-mean log2 eta* with its bootstrap interval, and the bootstrap means (for the drift)."""
    eta = {}
    boot_means = {}
    for w in widths:
        xs_star = np.array([f["x_star"] for f in per_seed[w].values()])
        xs_star = xs_star[np.isfinite(xs_star)]
        if xs_star.size == 0:
            eta[w] = {"log2_mean": math.nan, "log2_low": math.nan, "log2_high": math.nan, "seeds": 0}
            boot_means[w] = np.full(BOOTSTRAP, math.nan)
            continue
        boots = rng.choice(xs_star, size=(BOOTSTRAP, xs_star.size), replace=True).mean(axis=1)
        boot_means[w] = boots
        lo, hi = np.percentile(boots, INTERVAL)
        eta[w] = {"log2_mean": float(xs_star.mean()), "log2_low": float(lo), "log2_high": float(hi),
                  "seeds": int(xs_star.size), "edge": any(f["edge"] for f in per_seed[w].values())}
        for k in ("mean", "low", "high"):
            eta[w][k] = 2.0 ** eta[w][f"log2_{k}"]
    return eta, boot_means


def split_partial_seeds(rows: list[dict]) -> tuple[list[dict], dict]:
    """(rows of the seeds that ran this key's whole width x LR grid, {seed: (runs, grid size)} of the others).
    A seed still in progress (or missing a failed run) would be fitted on part of its curves: it is left out."""
    grid = {(r["width"], r["lr"]) for r in rows}
    have = defaultdict(set)
    for r in rows:
        have[r["seed"]].add((r["width"], r["lr"]))
    partial = {s: (len(cells), len(grid)) for s, cells in sorted(have.items()) if cells != grid}
    return [r for r in rows if r["seed"] not in partial], partial


def analyse(rows: list[dict], base_width: int | None = None, seed: int = 0) -> dict:
    """The verdict of one parametrisation x swept LR (rows of one key). See the module docstring."""
    complete, partial = split_partial_seeds(rows)
    rows = complete or rows  # no seed complete yet: judge what there is, but never PASS or FAIL on it
    curves = _curves(rows)
    widths = sorted(curves)
    base = base_width if base_width in curves else widths[0]
    rng = np.random.default_rng(seed)
    per_seed = {w: {s: optimum(*curves[w][s]) for s in sorted(curves[w])} for w in widths}
    eta, boot_means = _eta_star(per_seed, widths, rng)
    usable = [w for w in widths if eta[w]["seeds"]]
    log_w = np.log2(np.array(usable, float))
    drift = {"slope": math.nan, "low": math.nan, "high": math.nan}
    if len(usable) >= 2:
        drift["slope"] = _slope(log_w, np.array([eta[w]["log2_mean"] for w in usable]))
        boot = np.stack([boot_means[w] for w in usable], axis=1)  # (BOOTSTRAP, widths)
        slopes = np.polyfit(log_w, boot.T, 1)[0]
        drift["low"], drift["high"] = (float(v) for v in np.percentile(slopes, INTERVAL))

    x_base = eta[base]["log2_mean"] if eta[base]["seeds"] else math.nan
    fits, regret, wider = _regret_and_wider(curves, widths, base, x_base)
    reasons = []
    if not (math.isfinite(drift["low"]) and -DRIFT_TOL <= drift["low"] and drift["high"] <= DRIFT_TOL):
        reasons.append(f"drift interval [{drift['low']:+.3f}, {drift['high']:+.3f}] not within +-{DRIFT_TOL}")
    for w, r in regret.items():
        if not r["ok"]:
            reasons.append(f"width {w}: regret {r['regret']:.4f} > {REGRET_FRACTION:.3g} x gain {r['gain']:.4f}")
    missing = _incomplete(curves, per_seed)
    learned = _learned(rows, {w: fits[w]["loss_star"] for w in widths})
    unlearned = learned is not None and not learned["ok"]
    if unlearned:
        missing.insert(0, _unlearned_reason(learned))
    # A FAIL backed by intervals stands on an unbracketed optimum (the grid's edge only hides a larger drift
    # in its direction); a PASS needs intervals (>= MIN_SEEDS seeds), >= 3 points per curve, bracketed optima.
    enough_seeds = len(usable) >= 2 and all(len(curves[w]) >= MIN_SEEDS for w in widths)
    if not complete:
        missing.append("no seed has run the whole width x LR grid yet")
        enough_seeds = False
    verdict = "FAIL" if reasons and enough_seeds else ("INCOMPLETE" if missing or reasons else "PASS")
    if unlearned:  # neither a PASS nor a FAIL on models that did not learn
        verdict, reasons = "INCOMPLETE", []
    if verdict == "INCOMPLETE" and not reasons and missing:
        reasons = missing
    elif verdict == "FAIL":
        reasons += [f"(also: {m})" for m in missing]
    return {"verdict": verdict, "reasons": reasons, "widths": widths,
            "seeds": sorted({s for w in widths for s in curves[w]}) if complete else [], "base_width": base,
            "in_progress": {str(s): {"runs": n, "grid": m} for s, (n, m) in partial.items()},
            "eta_star": {str(w): eta[w] for w in widths}, "drift": drift,
            "regret": {str(w): r for w, r in regret.items()}, "wider_is_better": wider,
            "best_loss": {str(w): fits[w]["loss_star"] for w in widths}, "learned": learned,
            "thresholds": {"drift_tol": DRIFT_TOL, "regret_fraction": REGRET_FRACTION, "fit_points": FIT_POINTS,
                           "bootstrap": BOOTSTRAP, "interval_percentiles": list(INTERVAL),
                           "learned_fraction": LEARNED_FRACTION}}


def _regret_and_wider(curves: dict, widths: list[int], base: int, x_base: float) -> tuple[dict, dict, list]:
    """On the seed-mean curve of each width: its fit, the regret of the base width's optimum x_base (log2 LR)
    against the gain over the base width, and "wider is better" at every grid LR within 2x of x_base."""
    mean_curve = {}
    for w in widths:
        grid = sorted({x for xs, _ in curves[w].values() for x in xs})
        ys = [np.mean([ys_[list(xs_).index(x)] for xs_, ys_ in curves[w].values() if x in xs_]) for x in grid]
        mean_curve[w] = (np.array(grid), np.array(ys, float))
    fits = {w: optimum(*mean_curve[w]) for w in widths}
    regret = {}
    for w in widths:
        if w == base:
            continue
        at_base = loss_at(*mean_curve[w], fits[w], x_base) if math.isfinite(x_base) else math.inf
        own = fits[w]["loss_star"]
        gain = fits[base]["loss_star"] - own
        r = max(at_base - own, 0.0)
        regret[w] = {"regret": r, "gain": gain, "limit": REGRET_FRACTION * gain,
                     "ok": bool(r <= REGRET_FRACTION * gain)}
    wider = []
    for x in mean_curve[base][0]:
        if not math.isfinite(x_base) or abs(x - x_base) > 1.0 + 1e-9:
            continue
        losses = [float(mean_curve[w][1][list(mean_curve[w][0]).index(x)]) if x in mean_curve[w][0] else math.nan
                  for w in widths]
        wider.append({"lr": 2.0 ** x, "losses": losses,
                      "ok": bool(all(b < a for a, b in zip(losses, losses[1:])))})
    return fits, regret, wider


def _learned(rows: list[dict], best_loss: dict) -> dict | None:
    """Did every width learn more than token frequencies? None when the runs do not report a unigram entropy."""
    entropies = [r["unigram_entropy"] for r in rows if isinstance(r.get("unigram_entropy"), float)]
    if not entropies:
        return None
    entropy = float(np.mean(entropies))  # one validation set: the same number in every run
    limit = LEARNED_FRACTION * entropy
    not_below = {str(w): loss for w, loss in best_loss.items() if not loss < limit}
    return {"unigram_entropy": entropy, "fraction": LEARNED_FRACTION, "limit": limit,
            "ok": not not_below, "not_below": not_below}


def _unlearned_reason(learned: dict) -> str:
    return ("the models have not learned beyond token frequencies: best loss "
            + ", ".join(f"{loss:.3f} (w{w})" for w, loss in learned["not_below"].items())
            + f" not below {LEARNED_FRACTION:g} x unigram entropy {learned['unigram_entropy']:.3f}"
            f" = {learned['limit']:.3f}; train longer")


def _incomplete(curves: dict, per_seed: dict) -> list[str]:
    """Why a sweep cannot certify a PASS yet: too few seeds, too few LR points, or an unbracketed optimum."""
    out = []
    for w in sorted(curves):
        seeds = len(curves[w])
        if seeds < MIN_SEEDS:
            out.append(f"width {w}: {seeds} seed(s), an interval needs >= {MIN_SEEDS}")
        points = min(int(np.isfinite(ys).sum()) for _, ys in curves[w].values())
        if points < 3:
            out.append(f"width {w}: {points} finite LR point(s) in some seed, a fit needs >= 3")
        elif any(f["edge"] for f in per_seed[w].values()):
            out.append(f"width {w}: the best LR is on the grid's edge in some seed (widen the grid)")
    if len(curves) < 2:
        out.append("fewer than 2 widths")
    return out


def verdicts(rows: list[dict], base_width: int | None = None) -> dict:
    """{"<param>/<swept>": analyse(...)} over the finished (or diverged) runs of a sweep."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("status", "done") != "failed":
            groups[f"{r['parametrisation']}/{r['swept']}"].append(r)
    return {key: analyse(groups[key], base_width) for key in sorted(groups, key=_reading_order)}


def _reading_order(key: str) -> tuple:
    """muP first, then SP, then the mistakes; Adam before Muon: the order of the figure's panels and the tables."""
    param, swept = key.rsplit("/", 1)
    return {"muP": 0, "SP": 1}.get(param, 2), swept, param


# ---------------------------------------------------------------------------------------------
# Report and figures


def report(result: dict) -> str:
    lines = [f"transfer verdict: PASS when the drift interval lies within +-{DRIFT_TOL} (log2 eta* per log2 width) "
             f"and no width's regret exceeds {REGRET_FRACTION:.3g} of its gain over the base width; "
             f"intervals: {INTERVAL[1] - INTERVAL[0]:g}% bootstrap over seeds ({BOOTSTRAP} resamples)"]
    for key, v in result.items():
        d = v["drift"]
        lines.append(f"\n{key}: {v['verdict']}  drift {d['slope']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]  "
                     f"seeds {v['seeds']}")
        for w in v["widths"]:
            e = v["eta_star"][str(w)]
            if not e["seeds"]:
                lines.append(f"  width {w:>5}: no finite optimum")
                continue
            reg = v["regret"].get(str(w))
            extra = (f"  regret {reg['regret']:.4f} (limit {reg['limit']:.4f} = {REGRET_FRACTION:.3g} x gain "
                     f"{reg['gain']:+.4f}) {'ok' if reg['ok'] else 'TOO HIGH'}") if reg else "  (base)"
            lines.append(f"  width {w:>5}: eta* {e['mean']:.4g} [{e['low']:.4g}, {e['high']:.4g}]"
                         f"{' (at the grid edge)' if e.get('edge') else ''}  best loss {v['best_loss'][str(w)]:.4f}"
                         + extra)
        if v.get("learned"):
            lines.append(f"  learned: best loss below {LEARNED_FRACTION:g} x unigram entropy "
                         f"({v['learned']['limit']:.3f}) at every width: {'yes' if v['learned']['ok'] else 'NO'}")
        worse = [f"{p['lr']:.3g}" for p in v["wider_is_better"] if not p["ok"]]
        lines.append(f"  wider is better at every LR within 2x of the base optimum: "
                     + ("yes" if not worse else f"no (not at LR {', '.join(worse)})"))
        for reason in v["reasons"]:
            lines.append(f"  {'FAIL' if v['verdict'] == 'FAIL' else 'not yet'}: {reason}")
        for s, p in v.get("in_progress", {}).items():
            lines.append(f"  in progress: seed {s} has {p['runs']} of {p['grid']} runs, left out until complete")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The verdicts as one Markdown table (verdict.md, quoted by the README): a row per key, eta* per width
    with its interval, the drift with its interval, and the worst regret against its limit."""
    widths = sorted({w for v in result.values() for w in v["widths"]})
    head = ["key", "verdict", "seeds", "drift [95%]"] + [f"eta* w{w} [95%]" for w in widths] \
        + ["worst regret / limit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, v in result.items():
        d = v["drift"]
        running = "".join(f" (+{s}: {p['runs']}/{p['grid']} runs)" for s, p in v.get("in_progress", {}).items())
        cells = [f"`{key}`", f"**{v['verdict']}**", ", ".join(map(str, v["seeds"])) + running,
                 f"{d['slope']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"]
        for w in widths:
            e = v["eta_star"].get(str(w))
            cells.append(f"{e['mean']:.4f} [{e['low']:.4f}, {e['high']:.4f}]" if e and e["seeds"] else "-")
        worst = max(v["regret"].items(), key=lambda kv: kv[1]["regret"] - kv[1]["limit"], default=None)
        cells.append(f"{worst[1]['regret']:.3f} / {worst[1]['limit']:.3f} (w{worst[0]})" if worst else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nPASS: drift interval within +-{DRIFT_TOL} and every width's regret <= {REGRET_FRACTION:.3g} "
                 f"of its gain over the base width; {INTERVAL[1] - INTERVAL[0]:g}% bootstrap intervals over seeds; "
                 f"INCOMPLETE: fewer than {MIN_SEEDS} seeds, too few LR points, an optimum on the grid's edge, or a "
                 f"width whose best loss is not below {LEARNED_FRACTION:g} x the unigram entropy; "
                 f"(+S: n/m runs): seed S is still running its grid and is left out until complete.")
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], result: dict, path: Path) -> Path:
    """One panel per key: seed-mean loss vs LR, one curve per width (bars: min-max over seeds; star: eta*)."""
    import matplotlib  # here, not at the top: only the figures need it, and matplotlib is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(result)
    cols = min(2, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.0 * cols, 4.0 * nrows), squeeze=False)
    cmap = plt.get_cmap("plasma")
    for k, key in enumerate(keys):
        ax = axes[k // cols][k % cols]
        param, swept = key.rsplit("/", 1)
        v = result[key]
        curves = _curves([r for r in rows if r["parametrisation"] == param and r["swept"] == swept
                          and r.get("status", "done") != "failed"])
        for i, w in enumerate(v["widths"]):
            color = cmap(i / max(len(v["widths"]) - 1, 1) * 0.85)
            grid = sorted({x for xs, _ in curves[w].values() for x in xs})
            per_x = [[ys[list(xs).index(x)] for xs, ys in curves[w].values() if x in xs] for x in grid]
            mean = np.array([np.mean(p) for p in per_x])
            lo = np.array([np.min(p) for p in per_x])
            hi = np.array([np.max(p) for p in per_x])
            lrs = 2.0 ** np.array(grid)
            ax.errorbar(lrs, mean, yerr=[mean - lo, hi - mean], marker="o", ms=3, capsize=2, color=color,
                        label=f"width {w}")
            e = v["eta_star"][str(w)]
            if e["seeds"]:
                ax.axvline(e["mean"], color=color, lw=0.8, ls=":")
                ax.plot([e["mean"]], [v["best_loss"][str(w)]], marker="*", ms=12, color=color, markeredgecolor="k")
        ax.set_xscale("log", base=2)
        finite = [r["final_val_loss"] for r in rows if math.isfinite(r["final_val_loss"])]
        if finite:
            lo_y = min(finite)
            ax.set_ylim(lo_y - 0.02, lo_y + 4 * (np.median(finite) - lo_y) + 0.05)
        d = v["drift"]
        ax.set_title(f"{key}: {v['verdict']} (drift {d['slope']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}])",
                     fontsize=9)
        ax.set_xlabel(f"{swept} learning rate" if swept != "lr" else "LR multiplier")
        ax.set_ylabel("final validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(keys), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("Width x LR sweep: loss vs LR per width (seed mean, min-max bars; star and dotted line: eta*)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_drift(result: dict, path: Path) -> Path:
    """log2 eta* (relative to the base width's) against width, one line per key, with the +-DRIFT_TOL band."""
    import matplotlib  # here, not at the top: only the figures need it, and matplotlib is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    swepts = sorted({k.rsplit("/", 1)[1] for k in result})
    fig, axes = plt.subplots(1, len(swepts), figsize=(5.5 * len(swepts), 4.0), squeeze=False)
    for j, swept in enumerate(swepts):
        ax = axes[0][j]
        for key, v in result.items():
            if key.rsplit("/", 1)[1] != swept:
                continue
            ws = [w for w in v["widths"] if v["eta_star"][str(w)]["seeds"]]
            if not ws:
                continue
            ref = v["eta_star"][str(v["base_width"])]["log2_mean"] if str(v["base_width"]) in v["eta_star"] else 0
            ys = np.array([v["eta_star"][str(w)]["log2_mean"] for w in ws]) - ref
            lo = ys - (np.array([v["eta_star"][str(w)]["log2_low"] for w in ws]) - ref)
            hi = (np.array([v["eta_star"][str(w)]["log2_high"] for w in ws]) - ref) - ys
            d = v["drift"]
            ax.errorbar(ws, ys, yerr=[lo, hi], marker="o", capsize=3,
                        label=f"{key.rsplit('/', 1)[0]}: {d['slope']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] "
                              f"{v['verdict']}")
        w0 = min(min(v["widths"]) for v in result.values())
        w1 = max(max(v["widths"]) for v in result.values())
        xs = np.array([w0, w1], float)
        for sign in (1, -1):
            ax.plot(xs, sign * DRIFT_TOL * np.log2(xs / w0), color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel("log2(eta*) - log2(eta* at base)")
        ax.set_title(f"{swept} LR: optimum vs width (dashed: slope +-{DRIFT_TOL})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# W&B


def log_to_wandb(sweep_dir: Path, result: dict, figures: list[Path], required: bool = False) -> None:
    """The figures, the eta* table and the verdicts, as one summary run in the sweep's W&B group."""
    rows = [[key, w, v["eta_star"][str(w)].get("mean"), v["eta_star"][str(w)].get("low"),
             v["eta_star"][str(w)].get("high"), v["eta_star"][str(w)]["seeds"], v["verdict"], v["drift"]["slope"]]
            for key, v in result.items() for w in v["widths"]]
    summary = {f"verdict/{key}": v["verdict"] for key, v in result.items()}
    summary.update({f"drift/{key}": v["drift"]["slope"] for key, v in result.items()})
    log_summary_run(project="speedrun-mup-group", group=sweep_dir.name, name=f"{sweep_dir.name}-transfer-verdict",
                    images={f"transfer/{p.stem}": p for p in figures},
                    tables={"transfer/eta_star": (["key", "width", "eta_star", "low", "high", "seeds", "verdict",
                                                   "drift"], rows)},
                    summary=summary, required=required)
