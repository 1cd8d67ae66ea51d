"""Where one loss-vs-LR curve has its minimum: three estimators of eta*, and the curve's loss at any LR.

A curve is a sweep's final validation loss y at grid points x = log2(LR) (2x apart in the lab). Its
minimum lies between grid points, and how one reads it off matters: a quadratic over several octaves of
an asymmetric curve is biased by an amount that depends on the curve's shape, so on the width, and that
bias does not cancel in a drift (issue 19: muP/muon's drift read -0.10 with 5 points, -0.27 with 3). The
verdict (core/transfer.py) therefore asks three estimators and trusts only what they agree on:

  quad3    the parabola through the best grid point and its two neighbours: local, so the least biased by
           the curve's asymmetry, and the noisiest.
  cubic5   the least-squares cubic through the 5 finite grid points nearest the best one, read at its local
           minimum: smoother than quad3, and its u^3 term follows a curve that rises faster on one side.
  cubicgcv a least-squares cubic whose window the data choose: of the 5 or 6 finite points nearest the best
           one, the window with the lower generalised cross-validation score (RSS / k) / (1 - 4 / k)^2
           (Craven & Wahba 1979).

Why cubics and not wider parabolas: the parabolas through 5 points and through a GCV-chosen 4-7 were the
first edition's second and third estimators, and read every width's optimum ~0.02 octaves low, by an
amount that changes with width, because the lab's curves are asymmetric (steeper towards high LR). At a
true drift of -0.25 their 95% intervals covered 91.6% and 91.4% (core/calibration.py, 500 sweeps). A
cubic over the same points covers 93-96% on the shapes of both the muP/adam and the muP/muon curves; a
cubic over all 7 points does not (69% at +0.25 on the muP/muon shapes: a cubic cannot follow 6 octaves),
which is why cubicgcv's windows stop at 6. (Letting GCV also choose 7 points is not shown worse: at 500
sweeps it still covers >= 93%, 91.7% in one 300-sweep run; `python tests/test_calibration.py --mutations`
lists it as not caught.)

(The natural cubic spline through every point was the third estimator first; on this lab's flat-bottomed
Adam-LR curves its minimum follows the noise: core/calibration.py measured 85% coverage for a 95%
interval. It stays the reader of a curve's loss between grid points, `loss_at`, where it is exact at
every measured point.)

Each estimate carries a flag, so that nothing is silently made up:

  ""        a bracketed minimum
  "edge"    the best point is the lowest or highest finite LR: the minimum is not bracketed, and the
            estimate is that grid point (never an extrapolation)
  "few"     fewer than 3 finite points: the best grid point
  "clipped" the minimum lay outside the window: clipped to the window's edge (cubic5, cubicgcv; quad3's
            vertex always lies between its points)
  "concave" the fit has no local minimum (a parabola that opens downward or is flat, a cubic whose
            derivative has no root where it turns upward): the best grid point instead
  "none"    no finite point at all

Points that are not finite (diverged runs) are not part of a curve; core/transfer.py also leaves out
losses at or above the unigram entropy, and says so. `loss_at` reads a curve at any x inside its
measured range with the same natural spline, which passes through every measured point.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from numpy.polynomial import Polynomial
from scipy.interpolate import CubicSpline

ESTIMATORS = ("quad3", "cubic5", "cubicgcv")
CUBIC_POINTS = 5  # cubic5's window
GCV_WINDOWS = (5, 6)  # cubicgcv's candidate windows (a cubic through 4 points has no residual to judge it by)
SPLINE_SAMPLES_PER_UNIT = 64  # the spline's minimum is searched on this many points per grid unit (octave)


class Optimum(NamedTuple):
    x: float       # log2 eta*
    loss: float    # the estimator's loss at x
    flag: str      # "" | "edge" | "few" | "clipped" | "concave" | "none" (see the module docstring)


def finite(xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """The finite points of a curve, sorted by x."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    keep = np.isfinite(ys)
    order = np.argsort(xs[keep])
    return xs[keep][order], ys[keep][order]


def estimate(name: str, xs, ys) -> Optimum:
    """eta* of one curve (x = log2 LR, y = loss; NaN marks a diverged run) by estimator `name`."""
    if name not in ESTIMATORS:
        raise ValueError(f"estimator {name!r}: choose from {ESTIMATORS}")
    xs, ys = finite(xs, ys)
    if xs.size == 0:
        return Optimum(math.nan, math.nan, "none")
    best = int(np.argmin(ys))
    if xs.size < 3:
        return Optimum(float(xs[best]), float(ys[best]), "few")
    if best in (0, xs.size - 1):
        return Optimum(float(xs[best]), float(ys[best]), "edge")
    if name == "quad3":
        return _vertex(xs[best - 1:best + 2], ys[best - 1:best + 2], xs[best], ys[best])
    if xs.size < CUBIC_POINTS:  # a cubic needs a residual; too few points for one: the local parabola
        return _vertex(xs[best - 1:best + 2], ys[best - 1:best + 2], xs[best], ys[best])
    if name == "cubic5":
        idx = window(xs, best, CUBIC_POINTS)
    else:
        idx = _gcv_window(xs, ys, best)
    return _cubic_minimum(xs[idx], ys[idx], xs[best], ys[best])


def spline_minimum(xs, ys) -> Optimum:
    """The minimum of the natural spline through a curve's finite points (the best loss of a mean curve)."""
    xs, ys = finite(xs, ys)
    if xs.size < 3:
        return estimate("quad3", xs, ys)
    fine, values = spline_samples(xs, ys)
    k = int(np.argmin(values))
    if k in (0, fine.size - 1):
        return Optimum(float(fine[k]), float(values[k]), "edge")
    return _vertex(fine[k - 1:k + 2], values[k - 1:k + 2], fine[k], values[k])  # between the samples


def _gcv_window(xs: np.ndarray, ys: np.ndarray, best: int) -> np.ndarray:
    """cubicgcv: of GCV_WINDOWS (as many as there are points), the window whose cubic has the lowest GCV score."""
    choice = None
    for k in GCV_WINDOWS:
        if k > xs.size:
            break
        idx = window(xs, best, k)
        coeffs = polyfit(xs[idx], ys[idx], 3)
        resid = ys[idx] - np.polyval(coeffs, xs[idx])
        score = float(resid @ resid / k) / (1 - 4 / k) ** 2
        if choice is None or score < choice[0]:
            choice = (score, idx)
    return choice[1]


def window(xs: np.ndarray, best: int, points: int) -> np.ndarray:
    """Indices of the `points` finite points nearest the best one (ties: the lower LR), sorted."""
    order = sorted(range(xs.size), key=lambda i: (abs(xs[i] - xs[best]), xs[i]))
    return np.array(sorted(order[:points]))


def _vertex(wx: np.ndarray, wy: np.ndarray, best_x: float, best_y: float) -> Optimum:
    """The least-squares parabola's vertex, kept inside the window; the best point if it opens downward."""
    a, b, c = polyfit(wx, wy, 2)
    if not a > 0:
        return Optimum(float(best_x), float(best_y), "concave")
    x = -b / (2 * a)
    lo, hi = float(wx.min()), float(wx.max())
    flag = "clipped" if not lo <= x <= hi else ""
    x = float(np.clip(x, lo, hi))
    return Optimum(x, float(np.polyval((a, b, c), x)), flag)


def _cubic_minimum(wx: np.ndarray, wy: np.ndarray, best_x: float, best_y: float) -> Optimum:
    """The least-squares cubic's local minimum, kept inside the window; the best point if it has none.
    d x^3 + a x^2 + b x + c has its derivative's roots where 3d x^2 + 2a x + b = 0; the one where the curve
    turns upward (6d x + 2a = 2 sqrt(disc) > 0) is (sqrt(disc) - a) / (3d) = -b / (a + sqrt(disc)), the
    second form exact for a parabola (d = 0) and free of cancellation when d is small."""
    d, a, b, c = polyfit(wx, wy, 3)
    disc = a * a - 3 * d * b
    if disc <= 0:
        return Optimum(float(best_x), float(best_y), "concave")
    root = math.sqrt(disc)
    if a + root != 0:
        x = -b / (a + root)
    elif d != 0:
        x = (root - a) / (3 * d)
    else:  # a flat or downward parabola
        return Optimum(float(best_x), float(best_y), "concave")
    lo, hi = float(wx.min()), float(wx.max())
    flag = "clipped" if not lo <= x <= hi else ""
    x = float(np.clip(x, lo, hi))
    return Optimum(x, float(np.polyval((d, a, b, c), x)), flag)


def polyfit(wx: np.ndarray, wy: np.ndarray, degree: int) -> tuple[float, ...]:
    """Least-squares polynomial coefficients, highest power first (np.polyval's order), fitted in x - mean(x)
    for conditioning and expanded back."""
    mid = float(wx.mean())
    centred = Polynomial.fit(wx - mid, wy, degree, domain=[-1, 1], window=[-1, 1])  # in u = x - mid
    shifted = centred(Polynomial([-mid, 1.0]))  # the same polynomial in x
    coeffs = np.zeros(degree + 1)
    coeffs[:len(shifted.coef)] = shifted.coef
    return tuple(float(v) for v in coeffs[::-1])


@lru_cache(maxsize=256)
def _spline_basis(xs: tuple[float, ...]) -> tuple[CubicSpline, np.ndarray, np.ndarray]:
    """The natural cubic spline through the points `xs` is linear in their y: its basis (the spline of each unit
    vector) and its values on a fine grid, computed once per grid (a sweep has one or two)."""
    basis = CubicSpline(np.array(xs), np.eye(len(xs)), bc_type="natural")
    fine = np.linspace(xs[0], xs[-1], int(round((xs[-1] - xs[0]) * SPLINE_SAMPLES_PER_UNIT)) + 1)
    return basis, fine, basis(fine)  # (F,) and (F, k)


def spline_samples(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The natural spline through finite sorted points, on a fine grid over their range: (x, loss)."""
    _, fine, values = _spline_basis(tuple(float(x) for x in xs))
    return fine, values @ ys


def loss_at(xs, ys, x: float) -> float:
    """The curve's loss at x: the natural spline through its finite points (linear between two points, exact at
    one); inf outside the measured range, where the loss is unknown and treated as no better than divergence."""
    xs, ys = finite(xs, ys)
    if xs.size == 0 or not math.isfinite(x) or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return math.inf
    if xs.size < 3:
        return float(np.interp(x, xs, ys))
    basis, _, _ = _spline_basis(tuple(float(v) for v in xs))
    return float(basis(x) @ ys)
