"""Pointwise transforms: one reward (and its baseline, its length) to one shaped reward, in the
documented order: the kind, then scale and shift, then clip (spec.py says what each kind is)."""

from __future__ import annotations

import math

from rewardserve.transforms.fits import Calibration, LengthFit, sigmoid
from rewardserve.transforms.spec import TransformSpec


def log_sigmoid(x: float) -> float:
    """log(sigmoid(x)), without overflow or log(0) for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def shape(spec: TransformSpec, r: float, r_ref: float | None, tokens: int, length: LengthFit | None,
          calibration: Calibration | None) -> float:
    kind = spec.kind
    if kind == "none":
        y = r
    elif kind == "center":
        y = r - r_ref
    elif kind == "par":
        y = sigmoid(r - r_ref)
    elif kind == "logsigmoid":
        y = log_sigmoid(r - r_ref)
    elif kind == "length":
        y = r - length(tokens)
    elif kind == "calibrated":
        y = calibration(r - (r_ref or 0.0))
    else:
        raise ValueError(f"unknown transform {kind!r}")
    y = spec.scale * y + spec.shift
    if spec.clip is not None:
        y = min(max(y, spec.clip[0]), spec.clip[1])
    return y
