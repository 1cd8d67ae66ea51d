"""The transfer verdict as people read it: the printed report, verdict.md (the README's tables), the figures and
the W&B summary run. core/transfer.py computes the verdict; this module only shows it.

    python -m core.sweep collect docs/transfer     # calls report, markdown, plot_curves, plot_drift, plot_head_to_head
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from core.logger import log_summary_run
from core.optimum import ESTIMATORS
from core.transfer import CONFIDENCE, DRIFT_TOL, MIN_SEEDS, REGRET_TOL, curves, mean_curve

RULE = (f"PASS: for every estimator ({', '.join(ESTIMATORS)}) the {CONFIDENCE:.0%} interval of the drift lies "
        f"within +-{DRIFT_TOL} (log2 eta* per log2 width), no width's regret is shown above {REGRET_TOL} nats and "
        f"no wider width is shown to end higher at the transferred LR; FAIL: with >= {MIN_SEEDS} complete seeds, "
        f"every estimator finds one of these not shown; INCOMPLETE: the estimators disagree, or fewer than "
        f"{MIN_SEEDS} seeds, a best LR on the grid's edge, the base width missing, or a width whose best loss is "
        f"not below the bigram cross-entropy. Intervals: Student-t over per-seed values (seeds - 1 degrees of "
        f"freedom), calibrated on synthetic sweeps with this lab's noise (core/calibration.py).")


def _iv(d: dict, fmt: str = "+.2f") -> str:
    return f"{d['mean' if 'mean' in d else 'slope']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"


# ---------------------------------------------------------------------------------------------
# Text


def report(result: dict) -> str:
    lines = ["transfer verdict: " + RULE]
    for key, v in result.items():
        lines += [""] + _report_key(key, v)
    return "\n".join(lines)


def _report_key(key: str, v: dict) -> list[str]:
    ref = v["reference_estimator"]
    lines = [f"{key}: {v['verdict']}  seeds {v['seeds']}  base width {v['base_width']}"
             + ("" if v.get("base_width_given", True) else " (not given: the smallest width)")]
    lines.append("  drift: " + " | ".join(f"{n} {_iv(e['drift'], '+.3f')} {e['verdict']}"
                                          for n, e in v["estimators"].items()))
    for w in v["widths"]:
        etas = ", ".join(f"{n} {_eta(e['eta_star'][str(w)])}" for n, e in v["estimators"].items())
        reg = v["estimators"][ref]["regret"].get(str(w))
        extra = f"  regret ({ref}) {_iv(reg, '.4f')}" if reg else "  (base)"
        lines.append(f"  width {w:>5}: eta* {etas}  best loss {v['best_loss'][str(w)]:.4f}{extra}")
    for p in v["estimators"][ref]["wider_is_better"]:
        lines.append(f"  width {p['from']} -> {p['to']} at the transferred LR {p['lr']:.4g} ({ref}): "
                     f"{_iv(p, '+.4f')}  {'wider better' if p['shown'] else 'not shown' if p['ok'] else 'WORSE'}")
    lines.append(_learned_line(v["learned"]))
    flags = _flag_line(v)
    if flags:
        lines.append(flags)
    if v["excluded"]:
        non_finite = sum(e["rule"] == "non-finite loss" for e in v["excluded"])
        lines.append(f"  excluded as diverged: {len(v['excluded'])} run(s), {non_finite} with a non-finite loss and "
                     f"{len(v['excluded']) - non_finite} at or above the unigram entropy "
                     f"{v['unigram_entropy'] or math.nan:.4f} (the rule of core/transfer.py `curves`)")
    if "vs_SP" in v:
        lines += _report_vs_sp(v["vs_SP"], ref)
    for reason in v["reasons"]:
        lines.append(f"  {'FAIL' if v['verdict'] == 'FAIL' else 'not yet' if v['verdict'] == 'INCOMPLETE' else 'note'}"
                     f": {reason}")
    for s, p in v.get("in_progress", {}).items():
        lines.append(f"  in progress: seed {s} has {p['runs']} of {p['grid']} runs, left out until complete")
    return lines


def _eta(e: dict) -> str:
    return f"{e['mean']:.4g} [{e['low']:.4g}, {e['high']:.4g}]" if e["seeds"] else "-"


def _learned_line(learned: dict) -> str:
    if learned["bigram_xent"] is None:
        return f"  learned: UNKNOWN ({learned['reason']})"
    return (f"  learned: best loss below the bigram cross-entropy {learned['bigram_xent']:.4f} at every width: "
            + ("yes" if learned["ok"] else f"NO ({', '.join(f'w{w}' for w in learned['not_below'])})"))


def _flag_line(v: dict) -> str:
    parts = [f"{n} {flag} at w{w} in {k} seed(s)" for n, e in v["estimators"].items()
             for w, eta in e["eta_star"].items() for flag, k in eta["flags"].items()]
    return ("  flags: " + "; ".join(parts)) if parts else ""


def _report_vs_sp(h2h: dict, ref: str) -> list[str]:
    lines = ["  vs SP (paired by seed " + ", ".join(map(str, h2h["seeds"])) + "): drift muP - SP: "
             + " | ".join(f"{n} {_iv(e['drift_diff'], '+.3f')}" for n, e in h2h["estimators"].items())]
    for w, t in h2h["estimators"][ref]["widths"].items():
        lines.append(f"    width {w:>5} ({ref}): muP at the base eta* {_iv(t['muP_at_base'], '.4f')}, SP at the base "
                     f"eta* {_iv(t['SP_at_base'], '.4f')}, SP tuned {_iv(t['SP_tuned'], '.4f')}; muP - SP tuned "
                     f"{_iv(t['muP_at_base_minus_SP_tuned'], '+.4f')}")
    return lines


# ---------------------------------------------------------------------------------------------
# Markdown: verdict.md


def markdown(result: dict) -> str:
    """verdict.md: the verdict table (a row per key) and the head-to-head tables of muP against SP."""
    widths = sorted({w for v in result.values() for w in v["widths"]})
    ref = next(iter(result.values()))["reference_estimator"] if result else ESTIMATORS[0]
    head = ["key", "verdict", "seeds"] + [f"drift {n} [95%]" for n in ESTIMATORS] \
        + [f"eta* w{w} ({ref})" for w in widths] + [f"worst regret ({ref}, nats)", "best loss < bigram"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, v in result.items():
        running = "".join(f" (+{s}: {p['runs']}/{p['grid']} runs)" for s, p in v.get("in_progress", {}).items())
        cells = [f"`{key}`", f"**{v['verdict']}**", f"{len(v['seeds'])}{running}"]
        cells += [_iv(v["estimators"][n]["drift"]) for n in ESTIMATORS]
        for w in widths:
            e = v["eta_star"].get(str(w))
            cells.append(f"{e['mean']:.4f}" if e and e["seeds"] else "-")
        regrets = v["estimators"][ref]["regret"]
        worst = max(regrets.items(), key=lambda kv: kv[1]["mean"], default=None)
        cells.append(f"{_iv(worst[1], '.3f')} (w{worst[0]})" if worst else "-")
        cells.append("yes" if v["learned"]["ok"] else "no" if v["learned"]["bigram_xent"] is not None else "unknown")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", RULE, ""]
    for key, v in result.items():
        if "vs_SP" in v:
            lines += _markdown_vs_sp(key, v, ref)
    return "\n".join(lines) + "\n"


def _markdown_vs_sp(key: str, v: dict, ref: str) -> list[str]:
    swept = key.rsplit("/", 1)[1]
    h2h = v["vs_SP"]
    lines = [f"**muP vs SP, {swept} LR** (base width {v['base_width']}; final val loss in nats, mean over seeds "
             f"{', '.join(map(str, h2h['seeds']))} with 95% t-intervals; eta* by {ref}; differences paired by seed)",
             "", "| width | SP tuned per width | SP at the base eta* | muP at the base eta* | muP - SP tuned | "
                 "muP - SP at the base eta* |", "|---|---|---|---|---|---|"]
    for w, t in h2h["estimators"][ref]["widths"].items():
        lines.append(f"| {w} | {_iv(t['SP_tuned'], '.4f')} | {_iv(t['SP_at_base'], '.4f')} | "
                     f"{_iv(t['muP_at_base'], '.4f')} | {_iv(t['muP_at_base_minus_SP_tuned'], '+.4f')} | "
                     f"{_iv(t['muP_at_base_minus_SP_at_base'], '+.4f')} |")
    lines += ["", "drift muP - SP: " + "; ".join(f"{n} {_iv(e['drift_diff'], '+.3f')}"
                                                 for n, e in h2h["estimators"].items()), ""]
    return lines


# ---------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib  # here, not at the top: only the figures need it, and matplotlib is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], result: dict, path: Path) -> Path:
    """One panel per key: seed-mean loss vs LR, one curve per width (bars: min-max over seeds; star: eta*)."""
    plt = _pyplot()
    keys = list(result)
    cols = min(2, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.0 * cols, 4.0 * nrows), squeeze=False)
    cmap = plt.get_cmap("plasma")
    finite = [r["final_val_loss"] for r in rows if math.isfinite(r["final_val_loss"])]
    for k, key in enumerate(keys):
        ax = axes[k // cols][k % cols]
        param, swept = key.rsplit("/", 1)
        v = result[key]
        curve_set, _ = curves([r for r in rows if r["parametrisation"] == param and r["swept"] == swept
                               and r.get("status", "done") != "failed" and r["seed"] in v["seeds"]], None)
        for i, w in enumerate(v["widths"]):
            if w not in curve_set:
                continue
            color = cmap(i / max(len(v["widths"]) - 1, 1) * 0.85)
            xs, mean = mean_curve(curve_set[w])
            per_x = np.array([[ys[list(x_).index(x)] if x in x_ else math.nan for x in xs]
                              for x_, ys in curve_set[w].values()])
            ax.errorbar(2.0 ** xs, mean, yerr=[mean - np.nanmin(per_x, 0), np.nanmax(per_x, 0) - mean], marker="o",
                        ms=3, capsize=2, color=color, label=f"width {w}")
            e = v["eta_star"][str(w)]
            if e["seeds"]:
                ax.axvline(e["mean"], color=color, lw=0.8, ls=":")
                ax.plot([e["mean"]], [v["best_loss"][str(w)]], marker="*", ms=12, color=color, markeredgecolor="k")
        ax.set_xscale("log", base=2)
        if finite:
            lo_y = min(finite)
            ax.set_ylim(lo_y - 0.02, lo_y + 4 * (np.median(finite) - lo_y) + 0.05)
        drifts = ", ".join(f"{n} {e['drift']['slope']:+.2f}" for n, e in v["estimators"].items())
        ax.set_title(f"{key}: {v['verdict']} (drift {drifts})", fontsize=8)
        ax.set_xlabel(f"{swept} learning rate" if swept != "lr" else "LR multiplier")
        ax.set_ylabel("final validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(keys), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    ref = next(iter(result.values()))["reference_estimator"] if result else ""
    fig.suptitle(f"Width x LR sweep: loss vs LR per width (seed mean, min-max bars; star and dotted line: eta* by "
                 f"{ref})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_drift(result: dict, path: Path) -> Path:
    """log2 eta* (relative to the base width's) against width, one line per key, with the +-DRIFT_TOL band."""
    plt = _pyplot()
    swepts = sorted({k.rsplit("/", 1)[1] for k in result})
    fig, axes = plt.subplots(1, len(swepts), figsize=(6.0 * len(swepts), 4.2), squeeze=False)
    for j, swept in enumerate(swepts):
        ax = axes[0][j]
        for key, v in result.items():
            ws = [w for w in v["widths"] if v["eta_star"][str(w)]["seeds"]]
            if key.rsplit("/", 1)[1] != swept or not ws:
                continue
            ref = v["eta_star"][str(v["base_width"])]["log2_mean"] if str(v["base_width"]) in v["eta_star"] else 0
            ys = np.array([v["eta_star"][str(w)]["log2_mean"] for w in ws]) - ref
            lo = ys - (np.array([v["eta_star"][str(w)]["log2_low"] for w in ws]) - ref)
            hi = (np.array([v["eta_star"][str(w)]["log2_high"] for w in ws]) - ref) - ys
            ax.errorbar(ws, ys, yerr=[lo, hi], marker="o", capsize=3,
                        label=f"{key.rsplit('/', 1)[0]}: {_iv(v['drift'])} {v['verdict']}")
        w0 = min(min(v["widths"]) for v in result.values())
        w1 = max(max(v["widths"]) for v in result.values())
        xs = np.array([w0, w1], float)
        for sign in (1, -1):
            ax.plot(xs, sign * DRIFT_TOL * np.log2(xs / w0), color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel("log2(eta*) - log2(eta* at base)")
        est = next(iter(result.values()))["reference_estimator"]
        ax.set_title(f"{swept} LR: optimum vs width ({est}, 95% t-intervals; dashed: slope +-{DRIFT_TOL})",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_head_to_head(result: dict, path: Path) -> Path | None:
    """Per swept LR: loss against width at the base width's eta* (muP, SP) and SP tuned per width, 95% bars."""
    pairs = [(key, v) for key, v in result.items() if "vs_SP" in v]
    if not pairs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.0), squeeze=False)
    for j, (key, v) in enumerate(pairs):
        ax = axes[0][j]
        ref = v["reference_estimator"]
        table = v["vs_SP"]["estimators"][ref]["widths"]
        ws = [int(w) for w in table]
        for label, field, style in (("muP at the base width's eta*", "muP_at_base", "o-"),
                                    ("SP at the base width's eta*", "SP_at_base", "s--"),
                                    ("SP tuned per width", "SP_tuned", "^:")):
            m = np.array([table[str(w)][field]["mean"] for w in ws])
            lo = m - np.array([table[str(w)][field]["low"] for w in ws])
            hi = np.array([table[str(w)][field]["high"] for w in ws]) - m
            ax.errorbar(ws, m, yerr=[lo, hi], fmt=style, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel("final validation loss (nats/token)")
        ax.set_title(f"{key.rsplit('/', 1)[1]} LR: tune at width {v['base_width']}, train wider ({ref})", fontsize=9)
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
    rows = [[key, w, n, e["eta_star"][str(w)].get("mean"), e["eta_star"][str(w)].get("low"),
             e["eta_star"][str(w)].get("high"), e["eta_star"][str(w)]["seeds"], v["verdict"], e["drift"]["slope"]]
            for key, v in result.items() for n, e in v["estimators"].items() for w in v["widths"]]
    summary = {f"verdict/{key}": v["verdict"] for key, v in result.items()}
    summary.update({f"drift/{key}/{n}": e["drift"]["slope"] for key, v in result.items()
                    for n, e in v["estimators"].items()})
    log_summary_run(project="speedrun-mup-group", group=sweep_dir.name, name=f"{sweep_dir.name}-transfer-verdict",
                    images={f"transfer/{p.stem}": p for p in figures},
                    tables={"transfer/eta_star": (["key", "width", "estimator", "eta_star", "low", "high", "seeds",
                                                   "verdict", "drift"], rows)},
                    summary=summary, required=required)
