"""What a request, or a registry entry by default, asks of its rewards."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["none", "center", "par", "logsigmoid", "length", "calibrated"]
Baseline = Literal["reference", "group_mean", "group_median"]
Advantages = Literal["grpo", "rloo", "median", "winrate"]
_NEEDS_BASELINE = ("center", "par", "logsigmoid")


class TransformSpec(BaseModel):
    """y = kind(r), then y = scale * y + shift, then y clipped to [lo, hi]:

    none        r
    center      r - r_ref
    par         sigmoid(r - r_ref)            (Reward Shaping to Mitigate Reward Hacking in RLHF)
    logsigmoid  log sigmoid(r - r_ref)        (Transforming and Combining Rewards for Aligning LLMs)
    length      r - f(tokens), f the entry's length fit (rewardserve calibrate length)
    calibrated  g(r - r_ref), g the entry's calibration (rewardserve calibrate pairs); r_ref 0 when the
                fit is pointwise and no baseline is given

    r_ref, the baseline: a reference response's reward (each item's `reference`, scored by the same
    model), the mean or median of the item's group, or a number."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind = Field("none", description="none | center | par | logsigmoid | length | calibrated")
    baseline: Baseline | float | None = Field(None, description="r_ref: reference | group_mean | group_median | "
                                                                "a number")
    scale: float = Field(1.0, description="y = scale * y + shift, after the kind")
    shift: float = 0.0
    clip: tuple[float, float] | None = Field(None, description="[lo, hi], last")

    @model_validator(mode="after")
    def _check(self) -> "TransformSpec":
        numbers = [self.scale, self.shift, *(self.clip or ()),
                   *([self.baseline] if isinstance(self.baseline, float) else [])]
        if not all(math.isfinite(x) for x in numbers):
            raise ValueError("scale, shift, clip and a numeric baseline must be finite numbers")
        if self.kind in _NEEDS_BASELINE and self.baseline is None:
            raise ValueError(f"baseline: {self.kind} needs r_ref: 'reference', 'group_mean', 'group_median' or a "
                             "number")
        if self.kind in ("none", "length") and self.baseline is not None:
            raise ValueError(f"baseline: {self.kind} takes no baseline")
        if self.clip is not None and self.clip[0] > self.clip[1]:
            raise ValueError(f"clip: [{self.clip[0]}, {self.clip[1]}] is empty")
        return self

    @property
    def needs_group(self) -> bool:
        return self.baseline in ("group_mean", "group_median")
