"""The fits `rewardserve calibrate` writes and the server applies: one function each, used by both, so
a server started with a fit computes exactly what the fit predicted.

- Length fit (Bias Fitting to Mitigate Length Bias of Reward Model in RLHF): f(tokens), a least-squares
  polynomial of the rewards on the items' token counts; the `length` transform serves r - f(tokens).
- Calibration (Causal Judge Evaluation): g, a map from a reward difference (pairwise: r_a - r_b, fitted
  on labelled pairs taken in both orders) or from a reward (pointwise: fitted on items labelled good or
  bad) to a probability. `isotonic`: pool-adjacent-violators, interpolated linearly between the
  blocks' centres (increasing, and preserving the labels' mean on the fitted points up to that
  interpolation); `affine`: logistic, g(x) = sigmoid(a x + b), fitted by Newton's method.

Plus the report's measures: pairwise accuracy, Brier score, expected calibration error (10 equal bins)
and the reward-length correlation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1


@dataclass(frozen=True)
class LengthFit:
    coefficients: tuple[float, ...]  # highest degree first (numpy.polyval's order)

    def __call__(self, tokens: float) -> float:
        return float(np.polyval(self.coefficients, tokens))

    @classmethod
    def fit(cls, tokens: list[int], rewards: list[float], degree: int = 1) -> "LengthFit":
        if len(set(tokens)) <= degree:
            raise ValueError(f"a degree-{degree} length fit needs more than {degree} distinct lengths")
        return cls(tuple(float(c) for c in np.polyfit(np.asarray(tokens, float), np.asarray(rewards, float), degree)))

    def to_json(self) -> dict:
        return {"format": FORMAT, "kind": "length", "coefficients": list(self.coefficients)}


@dataclass(frozen=True)
class Calibration:
    method: str  # isotonic | affine
    domain: str  # pairwise (g takes r_a - r_b) | pointwise (g takes r)
    x: tuple[float, ...] = ()  # isotonic: block centres, increasing
    y: tuple[float, ...] = ()  # isotonic: block values, non-decreasing
    a: float = 0.0  # affine: sigmoid(a x + b)
    b: float = 0.0

    def __call__(self, x: float) -> float:
        if self.method == "affine":
            return sigmoid(self.a * x + self.b)
        return float(np.interp(x, self.x, self.y))

    @classmethod
    def fit(cls, x: list[float], y: list[float], method: str, domain: str) -> "Calibration":
        xs, ys = np.asarray(x, float), np.asarray(y, float)
        if method == "affine":
            a, b = logistic(xs, ys)
            return cls(method, domain, a=a, b=b)
        if method != "isotonic":
            raise ValueError(f"method {method!r}: isotonic or affine")
        centres, values = isotonic(xs, ys)
        return cls(method, domain, tuple(centres), tuple(values))

    def to_json(self) -> dict:
        out = {"format": FORMAT, "kind": "calibration", "method": self.method, "domain": self.domain}
        out.update({"x": list(self.x), "y": list(self.y)} if self.method == "isotonic" else {"a": self.a, "b": self.b})
        return out


def load(path: str | Path, kind: str) -> LengthFit | Calibration:
    """A fit file of `kind` (length | calibration); ValueError says what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the fit {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != kind or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {kind} fit written by `rewardserve calibrate`")
    try:
        if kind == "length":
            return LengthFit(tuple(float(c) for c in data["coefficients"]))
        fit = Calibration(data["method"], data["domain"], tuple(map(float, data.get("x", ()))),
                          tuple(map(float, data.get("y", ()))), float(data.get("a", 0)), float(data.get("b", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc!r}") from None
    if fit.method not in ("isotonic", "affine") or fit.domain not in ("pairwise", "pointwise") or (
            fit.method == "isotonic" and (len(fit.x) != len(fit.y) or not fit.x)):
        raise ValueError(f"{path}: not a valid calibration")
    return fit


# --- the fitting ---------------------------------------------------------------------------------------
def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def isotonic(x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Pool adjacent violators on y ordered by x (equal x pooled first): (block centres, block means),
    the centres strictly increasing. Written here because it is twenty lines, where scikit-learn or
    SciPy would be a large dependency."""
    ux, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=y)
    blocks: list[list[float]] = []  # [sum of x, sum of y, count]
    for xi, sy, n in zip(ux, sums, counts):
        blocks.append([float(xi) * n, float(sy), int(n)])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            sx, sy2, n2 = blocks.pop()
            blocks[-1][0] += sx
            blocks[-1][1] += sy2
            blocks[-1][2] += n2
    return [float(b[0] / b[2]) for b in blocks], [float(b[1] / b[2]) for b in blocks]


def logistic(x: np.ndarray, y: np.ndarray, steps: int = 50) -> tuple[float, float]:
    """Maximum-likelihood sigmoid(a x + b), by Newton's method (a tiny ridge keeps separable data finite)."""
    w = np.zeros(2)
    design = np.stack([x, np.ones_like(x)], 1)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + 1e-6 * w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


# --- the report's measures ------------------------------------------------------------------------------
def brier(p: list[float], y: list[float]) -> float:
    return float(np.mean((np.asarray(p) - np.asarray(y)) ** 2))


def ece(p: list[float], y: list[float], bins: int = 10) -> float:
    """Expected calibration error over `bins` equal-width bins of p: sum of |bin|/N |mean p - mean y|."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[which == k].mean() - y[which == k].mean()) * (which == k).sum()
                     for k in range(bins) if (which == k).any()) / len(p))


def pairwise_accuracy(diffs: list[float]) -> float:
    """Share of pairs whose chosen response scores higher (a tie counts one half)."""
    d = np.asarray(diffs, float)
    return float(((d > 0) + 0.5 * (d == 0)).mean())


def correlation(x: list[float], y: list[float]) -> float:
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and np.std(x) > 0 and np.std(y) > 0 else float("nan")
