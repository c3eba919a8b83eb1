"""Statistics for reward drift and reward-hacking signals (pure functions over numpy arrays)."""

from __future__ import annotations

import math

import numpy as np

_EPS = 1e-4  # floor for empty PSI bins: keeps the log finite, as is standard practice


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over the reference's quantile bins (0.1 moderate, 0.25 large shift)."""
    if len(reference) < 2 or len(current) < 1:
        return float("nan")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # a constant reference: everything else is a shift
        return float("inf") if np.any(current != reference[0]) else 0.0
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.histogram(reference, edges)[0] / len(reference)
    cur = np.histogram(current, edges)[0] / len(current)
    ref, cur = np.maximum(ref, _EPS), np.maximum(cur, _EPS)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks(reference: np.ndarray, current: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    if len(reference) == 0 or len(current) == 0:
        return float("nan")
    a, b = np.sort(reference), np.sort(current)
    points = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, points, "right") / len(a)
                               - np.searchsorted(b, points, "right") / len(b))))


def mean_shift(reference: np.ndarray, current: np.ndarray) -> float:
    """(mean(current) - mean(reference)) / std(reference)."""
    if len(reference) < 2 or len(current) == 0:
        return float("nan")
    sd = float(np.std(reference))
    diff = float(np.mean(current) - np.mean(reference))
    return diff / sd if sd > 0 else (0.0 if diff == 0 else math.copysign(float("inf"), diff))


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation (nan when either side is constant or too short)."""
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def fitted_buckets(sample: list[float], n: int = 24) -> list[float]:
    """Histogram bucket edges covering a warm-up sample of rewards, 3 standard deviations beyond it."""
    arr = np.asarray(sample, dtype=float)
    arr = arr[np.isfinite(arr)]
    if len(arr) == 0:
        return [float(x) for x in np.linspace(-10, 10, n)]
    sd = float(np.std(arr)) or max(1.0, abs(float(np.mean(arr))) * 0.1)
    lo, hi = float(np.min(arr)) - 3 * sd, float(np.max(arr)) + 3 * sd
    return [round(float(x), 6) for x in np.linspace(lo, hi, n)]
