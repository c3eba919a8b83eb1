"""Every transform, advantage and fit on small vectors, computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from rewardserve.transforms import fits
from rewardserve.transforms.group import advantages, baseline, partition
from rewardserve.transforms.pointwise import log_sigmoid, shape
from rewardserve.transforms.spec import TransformSpec

LENGTH = fits.LengthFit((0.5, -2.0))  # f(t) = 0.5 t - 2
ISO = fits.Calibration("isotonic", "pairwise", (-1.0, 0.0, 2.0), (0.1, 0.5, 0.9))
AFFINE = fits.Calibration("affine", "pointwise", a=2.0, b=-1.0)


@pytest.mark.parametrize("spec,r,ref,tokens,want", [
    ({"kind": "none"}, 1.5, None, 7, 1.5),
    ({"kind": "center", "baseline": 0.5}, 1.5, 0.5, 7, 1.0),
    ({"kind": "par", "baseline": "reference"}, 1.5, 0.5, 7, 1 / (1 + math.exp(-1.0))),
    ({"kind": "logsigmoid", "baseline": "group_mean"}, 1.5, 0.5, 7, math.log(1 / (1 + math.exp(-1.0)))),
    ({"kind": "length"}, 1.5, None, 7, 1.5 - (0.5 * 7 - 2.0)),
    ({"kind": "calibrated", "baseline": 0.5}, 1.5, 0.5, 7, 0.5 + (0.9 - 0.5) * 1.0 / 2.0),  # interpolated at d = 1
    ({"kind": "par", "baseline": 0.0, "scale": 2.0, "shift": -1.0}, 0.0, 0.0, 7, 0.0),  # 2 * 0.5 - 1
    ({"kind": "center", "baseline": 0.0, "scale": 3.0, "clip": [-1.0, 2.0]}, 1.5, 0.0, 7, 2.0),  # clip is last
    ({"kind": "center", "baseline": 0.0, "clip": [-1.0, 2.0]}, -4.0, 0.0, 7, -1.0),
    ({"kind": "calibrated", "baseline": 0.0}, -5.0, 0.0, 7, 0.1),  # flat outside the fitted range
])
def test_pointwise_transforms_by_hand(spec, r, ref, tokens, want):
    assert shape(TransformSpec(**spec), r, ref, tokens, LENGTH, ISO) == pytest.approx(want, abs=1e-12)


def test_affine_calibration_and_log_sigmoid_at_the_extremes():
    assert AFFINE(0.75) == pytest.approx(1 / (1 + math.exp(-0.5)), abs=1e-15)
    assert log_sigmoid(800.0) == 0.0 and log_sigmoid(-800.0) == -800.0  # no overflow, no log(0)
    assert log_sigmoid(0.0) == pytest.approx(math.log(0.5), abs=1e-15)


@pytest.mark.parametrize("spec,message", [
    ({"kind": "par"}, "needs r_ref"),
    ({"kind": "length", "baseline": 0.0}, "takes no baseline"),
    ({"kind": "none", "baseline": "reference"}, "takes no baseline"),
    ({"kind": "center", "baseline": 0.0, "clip": [1.0, -1.0]}, "is empty"),
    ({"kind": "center", "baseline": "somewhere"}, "Input should be"),
    ({"kind": "shout"}, "Input should be"),
    ({"kind": "center", "baseline": 0.0, "offset": 1}, "Extra inputs"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValidationError, match=message):
        TransformSpec(**spec)


def test_advantages_by_hand_with_ties_singletons_and_constant_groups():
    r = [1.0, 2.0, 2.0, 5.0]
    mean, std = 2.5, math.sqrt(((1.5 ** 2) + 0.25 + 0.25 + 2.5 ** 2) / 3)  # Bessel's correction
    assert advantages(r, "grpo") == pytest.approx([(x - mean) / (std + 1e-4) for x in r], abs=1e-12)
    assert advantages(r, "rloo") == pytest.approx([1 - 9 / 3, 2 - 8 / 3, 2 - 8 / 3, 5 - 5 / 3], abs=1e-12)
    assert advantages(r, "median") == pytest.approx([-1.0, 0.0, 0.0, 3.0], abs=1e-12)
    assert advantages(r, "winrate") == pytest.approx([0.0, 1.5 / 3, 1.5 / 3, 1.0], abs=1e-12)  # a tie is a half
    for method in ("grpo", "rloo", "median", "winrate"):
        assert advantages([3.7], method) == [0.0]  # a group of one
    assert advantages([2.0, 2.0, 2.0], "grpo") == [0.0, 0.0, 0.0]  # std 0: no division by zero
    assert advantages([2.0, 2.0], "winrate") == [0.5, 0.5]
    with pytest.raises(ValueError):
        advantages(r, "ppo")


def test_group_baselines_and_partition():
    assert baseline([1.0, 2.0, 6.0], "group_mean") == 3.0 and baseline([1.0, 2.0, 6.0], "group_median") == 2.0
    assert baseline([1.0, 2.0, 6.0, 8.0], "group_median") == 4.0
    assert partition(5, [[0, 3], [3, 4]]) == [[0, 3], [4], [1], [2]]


def test_isotonic_pools_adjacent_violators_by_hand():
    x = np.array([0.0, 1.0, 2.0, 3.0, 3.0, 4.0])
    y = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    centres, values = fits.isotonic(x, y)
    # x=3 is pooled first (mean 0.5); 1.0 then 0.0 violate: (1, 2) pooled to 0.5 at x 1.5; then 0.5 <= 0.5 stays
    assert centres == [0.0, 1.5, 3.0, 4.0] and values == [0.0, 0.5, 0.5, 1.0]
    cal = fits.Calibration.fit(list(x), list(y), "isotonic", "pointwise")
    assert cal(1.5) == 0.5 and cal(3.5) == 0.75 and cal(-9) == 0.0 and cal(9) == 1.0


def test_logistic_fit_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, 20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-(1.5 * x - 0.5)))).astype(float)
    a, b = fits.logistic(x, y)
    assert a == pytest.approx(1.5, abs=0.1) and b == pytest.approx(-0.5, abs=0.1)


def test_length_fit_removes_a_linear_length_bias():
    tokens = [10, 20, 30, 40, 50]
    rewards = [0.2 * t + 1.0 + e for t, e in zip(tokens, [0.1, -0.1, 0.0, 0.1, -0.1])]
    fit = fits.LengthFit.fit(tokens, rewards, 1)
    mx, my = sum(tokens) / 5, sum(rewards) / 5  # least squares by hand: slope cov/var, intercept through the means
    slope = sum((t - mx) * (r - my) for t, r in zip(tokens, rewards)) / sum((t - mx) ** 2 for t in tokens)
    assert fit.coefficients == pytest.approx((slope, my - slope * mx), abs=1e-12)
    shaped = [r - fit(t) for r, t in zip(rewards, tokens)]
    assert abs(fits.correlation(shaped, tokens)) < 1e-9 < abs(fits.correlation(rewards, tokens))
    with pytest.raises(ValueError, match="distinct lengths"):
        fits.LengthFit.fit([5, 5, 5], [1.0, 2.0, 3.0], 1)


def test_measures_by_hand():
    assert fits.pairwise_accuracy([1.0, -1.0, 0.0, 2.0]) == (1 + 0 + 0.5 + 1) / 4
    assert fits.brier([0.9, 0.2], [1.0, 0.0]) == pytest.approx((0.01 + 0.04) / 2)
    # two bins: [0.1, 0.15] -> mean p 0.125, mean y 0; [0.85] -> 0.85 vs 1
    assert fits.ece([0.1, 0.15, 0.85], [0.0, 0.0, 1.0]) == pytest.approx((2 * 0.125 + 1 * 0.15) / 3)


def test_fits_round_trip_through_their_files(tmp_path):
    for fit, kind in ((LENGTH, "length"), (ISO, "calibration"), (AFFINE, "calibration")):
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps(fit.to_json()))
        assert fits.load(path, kind) == fit
    with pytest.raises(ValueError, match="not a length fit"):
        fits.load(tmp_path / "calibration.json", "length")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        fits.load(tmp_path / "bad.json", "length")
