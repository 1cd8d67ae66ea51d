"""Where one loss-vs-LR curve has its minimum: three estimators of eta*, and the curve's loss at any LR.

A curve is a sweep's final validation loss y at grid points x = log2(LR) (2x apart in the lab). Its
minimum lies between grid points, and how one reads it off matters: a quadratic over several octaves of
an asymmetric curve is biased by an amount that depends on the curve's shape, so on the width, and that
bias does not cancel in a drift (issue 19: muP/muon's drift read -0.10 with 5 points, -0.27 with 3). The
verdict (core/transfer.py) therefore asks three estimators and trusts only what they agree on:

  quad3   the parabola through the best grid point and its two neighbours: local, so the least biased by
          the curve's asymmetry, and the noisiest.
  quad5   the least-squares parabola through the 5 finite grid points nearest the best one: smoother, and
          biased where the curve is asymmetric over those 4 octaves.
  quadgcv a least-squares parabola whose window the data choose: of the 4, 5, 6 or 7 finite points nearest
          the best one, the window with the lowest generalised cross-validation score
          (RSS / k) / (1 - 3 / k)^2 (Craven & Wahba 1979), so a curve that is parabolic over many octaves
          is read over many, an asymmetric one over few.

(The natural cubic spline through every point was the third estimator first; on this lab's flat-bottomed
Adam-LR curves its minimum follows the noise: core/calibration.py measured 85% coverage for a 95%
interval. It stays the reader of a curve's loss between grid points, `loss_at`, where it is exact at
every measured point.)

Each estimate carries a flag, so that nothing is silently made up:

  ""        a bracketed minimum
  "edge"    the best point is the lowest or highest finite LR: the minimum is not bracketed, and the
            estimate is that grid point (never an extrapolation)
  "few"     fewer than 3 finite points: the best grid point
  "clipped" the vertex lay outside the window: clipped to the window's edge (quad5, quadgcv; quad3's
            vertex always lies between its points)
  "concave" the parabola opens downward (or is flat; quadgcv: every window's): the best grid point instead
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
from scipy.interpolate import CubicSpline

ESTIMATORS = ("quad3", "quad5", "quadgcv")
QUAD5_POINTS = 5
GCV_WINDOWS = (4, 5, 6, 7)  # quadgcv's candidate windows (a 3-point parabola has no residual to judge it by)
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
    if name == "quad5":
        idx = window(xs, best, QUAD5_POINTS)
        return _vertex(xs[idx], ys[idx], xs[best], ys[best])
    return _gcv_vertex(xs, ys, best)


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


def _gcv_vertex(xs: np.ndarray, ys: np.ndarray, best: int) -> Optimum:
    """quadgcv: the vertex of the convex window of GCV_WINDOWS with the lowest GCV score."""
    choice = None
    for k in GCV_WINDOWS:
        if k > xs.size:
            break
        idx = window(xs, best, k)
        a, b, c = parabola(xs[idx], ys[idx])
        resid = ys[idx] - np.polyval((a, b, c), xs[idx])
        score = float(resid @ resid / k) / (1 - 3 / k) ** 2
        if a > 0 and (choice is None or score < choice[0]):
            choice = (score, idx)
    if choice is None:
        return Optimum(float(xs[best]), float(ys[best]), "concave")
    return _vertex(xs[choice[1]], ys[choice[1]], xs[best], ys[best])


def window(xs: np.ndarray, best: int, points: int) -> np.ndarray:
    """Indices of the `points` finite points nearest the best one (ties: the lower LR), sorted."""
    order = sorted(range(xs.size), key=lambda i: (abs(xs[i] - xs[best]), xs[i]))
    return np.array(sorted(order[:points]))


def _vertex(wx: np.ndarray, wy: np.ndarray, best_x: float, best_y: float) -> Optimum:
    """The least-squares parabola's vertex, kept inside the window; the best point if it opens downward."""
    a, b, c = parabola(wx, wy)
    if not a > 0:
        return Optimum(float(best_x), float(best_y), "concave")
    x = -b / (2 * a)
    lo, hi = float(wx.min()), float(wx.max())
    flag = "clipped" if not lo <= x <= hi else ""
    x = float(np.clip(x, lo, hi))
    return Optimum(x, float(np.polyval((a, b, c), x)), flag)


def parabola(wx: np.ndarray, wy: np.ndarray) -> tuple[float, float, float]:
    """(a, b, c) of the least-squares a x^2 + b x + c (exact through 3 points), centred for conditioning."""
    mid = float(wx.mean())
    u = wx - mid
    design = np.stack([u * u, u, np.ones_like(u)], axis=1)
    a, b, c = np.linalg.solve(design.T @ design, design.T @ wy)
    return float(a), float(b - 2 * a * mid), float(c - b * mid + a * mid * mid)


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
