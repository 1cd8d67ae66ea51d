"""The transfer verdict keeps what its numbers claim, at this lab's real noise (core/calibration.py).

Synthetic sweeps on the committed lab's grid (docs/transfer/sweep.csv: widths 32-256, 7 LRs 2x apart), with
curves shaped like its muP seed-mean curves (the Adam-LR sweep's and the Muon-LR sweep's, each in turn) and
the noise of its real seeds, 5 seeds as the lab has, go through the same `core.transfer.analyse` as the real
sweep. Asserted, with the numbers written here and not
read from the module under test:
  * every estimator's 95% drift interval covers the true drift >= 93% of the time, at true drifts 0 and
    +-0.25;
  * at a true drift equal to the tolerance, 0.25 per doubling of width, the verdict PASSes <= 5% of sweeps;
  * at true drift 0 it PASSes >= 80%;
  * synthetic sweeps whose models end above the bigram, or that have no bigram reference, never PASS.
These fail when the interval is replaced by the percentile bootstrap of the first edition or by a bare
|slope| <= 0.45, when the tolerance or an estimator's window is changed, and when the learned gate is off:
`python tests/test_calibration.py --mutations` runs this file once per mutation (MUTATIONS below) and prints
which tests each one fails (README "muP transfer" has the table).
"""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script (--mutations) from anywhere
from core import calibration, optimum, transfer
from core.sweep import read_csv

CSV = Path(__file__).resolve().parent.parent / "docs" / "transfer" / "sweep.csv"
SWEEPS = 500
SEEDS = 5  # the committed lab's seeds of muP and SP


@pytest.fixture(scope="module", autouse=True)
def mutation():
    """The mutation named by $CALIBRATION_MUTATION (only `--mutations` sets it), applied for the whole module."""
    name = os.environ.get("CALIBRATION_MUTATION")
    with MUTATIONS[name][1]() if name else contextlib.nullcontext():
        yield


@pytest.fixture(scope="module", params=["muP/adam", "muP/muon"])
def lab(request, mutation):
    """The grid and curve shapes of each muP sweep (the Muon-LR curves are the more asymmetric ones)."""
    return calibration.Lab(read_csv(CSV), request.param)


@pytest.fixture(scope="module")
def rates(lab):
    return calibration.simulate(lab, drifts=(0.0, 0.25, -0.25), sweeps=SWEEPS, seeds=SEEDS, rng_seed=0)


def test_the_noise_comes_from_enough_real_seeds(lab):
    assert len(lab.pool) >= 4 * SEEDS  # muP and SP, both sweeps, every seed
    assert 0.004 < lab.median_abs_noise < 0.03  # nats: the lab's own spread, not a made-up one
    assert lab.widths == [32, 64, 128, 256] and len(lab.grid) == 7


def test_every_estimators_interval_covers_the_true_drift(rates):
    for drift, r in rates.items():
        for name, coverage in r["coverage"].items():
            assert coverage >= 0.93, f"{name} at true drift {drift:+}: coverage {coverage:.1%} of 95% intervals"


def test_a_drift_at_the_tolerance_rarely_passes_and_no_drift_usually_does(rates):
    for drift in (0.25, -0.25):
        assert rates[drift]["pass"] <= 0.05, f"true drift {drift:+}: PASS in {rates[drift]['pass']:.1%} of sweeps"
    assert rates[0.0]["pass"] >= 0.80, f"true drift 0: PASS in only {rates[0.0]['pass']:.1%} of sweeps"


def test_models_that_did_not_beat_the_bigram_never_pass(lab):
    rng = np.random.default_rng(1)
    for _ in range(20):
        rows = lab.sweep(0.0, SEEDS, rng)
        assert transfer.analyse(rows, lab.base)["learned"]["ok"]
        low_bar = [dict(r, bigram_xent=2.2) for r in rows]  # below the narrow widths' best losses (~2.2-2.3)
        assert transfer.analyse(low_bar, lab.base)["verdict"] == "INCOMPLETE"
        no_ref = [{k: v for k, v in r.items() if k != "bigram_xent"} for r in rows]
        assert transfer.analyse(no_ref, lab.base)["verdict"] == "INCOMPLETE"


# ---------------------------------------------------------------------------------------------
# Mutations: real changes the tests above must catch (`python tests/test_calibration.py --mutations`)


_T_INTERVAL = transfer.t_interval


def _percentile_bootstrap(values, confidence=transfer.CONFIDENCE):
    """The first edition's interval: 2000 resamples of the seeds, the mean's 2.5 and 97.5 percentiles."""
    v = np.asarray([x for x in values if not np.isnan(x)], float)
    if v.size < 2 or not np.isfinite(v).all():
        return _T_INTERVAL(v, confidence)
    means = np.random.default_rng(0).choice(v, size=(2000, v.size)).mean(axis=1)
    q = (1 - confidence) / 2
    return {"mean": float(v.mean()), "low": float(np.quantile(means, q)), "high": float(np.quantile(means, 1 - q)),
            "n": int(v.size)}


def _point_estimate(values, confidence=transfer.CONFIDENCE):
    iv = _T_INTERVAL(values, confidence)
    return dict(iv, low=iv["mean"], high=iv["mean"])


@contextlib.contextmanager
def _patched(*changes):
    """Set (object, attribute, value) for the block; restore after."""
    old = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in changes]
    for obj, attr, value in changes:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in old:
            setattr(obj, attr, value)


MUTATIONS = {
    "percentile_bootstrap": ("intervals: the first edition's percentile bootstrap over seeds",
                             lambda: _patched((transfer, "t_interval", _percentile_bootstrap))),
    "bare_slope": ("drift: the point estimate within +-0.45, no interval",
                   lambda: _patched((transfer, "t_interval", _point_estimate), (transfer, "DRIFT_TOL", 0.45))),
    "tolerance_0.35": ("drift tolerance 0.25 -> 0.35", lambda: _patched((transfer, "DRIFT_TOL", 0.35))),
    "tolerance_0.15": ("drift tolerance 0.25 -> 0.15", lambda: _patched((transfer, "DRIFT_TOL", 0.15))),
    "cubic5_window_7": ("cubic5 over 7 points", lambda: _patched((optimum, "CUBIC_POINTS", 7))),
    "gcv_windows_to_7": ("cubicgcv's windows 5-6 -> 5-7", lambda: _patched((optimum, "GCV_WINDOWS", (5, 6, 7)))),
    "parabolas": ("cubic5 and cubicgcv fit parabolas (the first edition's quad5 / a GCV parabola)",
                  lambda: _patched((optimum, "_cubic_minimum", optimum._vertex))),
    "gate_off": ("the learned gate always passes",
                 lambda: _patched((transfer, "_learned", lambda rows, best: {"ok": True, "bigram_xent": None,
                                                                             "not_below": {}, "reason": ""}))),
}


if __name__ == "__main__" and "--mutations" in sys.argv:
    print(f"{'mutation':<22} tests of this file it fails (lab key)  |  what it changes")
    for name, (description, _) in MUTATIONS.items():
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-rf"],
                             env={**os.environ, "CALIBRATION_MUTATION": name}, capture_output=True, text=True).stdout
        failed = [line.split("::")[1].split(" ")[0].removeprefix("test_")
                  for line in out.splitlines() if line.startswith("FAILED")]
        print(f"{name:<22} {', '.join(failed) or 'NONE: not caught'}  |  {description}", flush=True)
