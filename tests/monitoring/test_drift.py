"""Drift and reward-hacking signals: low before a shift, high after it; endpoints and reference control."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from rewardserve.config import ServerSettings, quick
from rewardserve.monitoring import drift
from rewardserve.monitoring.metrics import Metrics
from rewardserve.monitoring.monitor import RewardMonitor
from tests.server import serve

RNG = np.random.default_rng(0)


def test_statistics_separate_same_from_shifted_distributions():
    ref, same, shifted = RNG.normal(0, 1, 300), RNG.normal(0, 1, 300), RNG.normal(1, 1, 300)
    assert drift.psi(ref, same) < 0.1 and drift.psi(ref, shifted) > 0.25
    assert drift.ks(ref, same) < 0.15 and drift.ks(ref, shifted) > 0.3
    assert abs(drift.mean_shift(ref, same)) < 0.3 and drift.mean_shift(ref, shifted) > 0.7
    assert drift.ks(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    x = np.arange(100.0)
    assert drift.correlation(x, 2 * x + 1) == pytest.approx(1.0) and np.isnan(drift.correlation(x, np.ones(100)))
    edges = drift.fitted_buckets([1.0, 2.0, 3.0])
    assert edges[0] < 1.0 and edges[-1] > 3.0 and edges == sorted(edges)


def _monitor(default: bool = True, **kw) -> tuple[RewardMonitor, Metrics]:
    metrics = Metrics()
    settings = ServerSettings(drift_window=200, drift_reference_size=200, **kw)
    return RewardMonitor(settings, metrics, "m", ["LABEL_0"], drift.fitted_buckets([0.0, 1.0]), default), metrics


def _gauge(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, {"model": "m", "head": "LABEL_0", **labels})


def test_drift_gauges_stay_low_before_a_shift_and_rise_after_it():
    mon, metrics = _monitor()

    async def run():
        mon.observe([[v] for v in RNG.normal(0, 1, 200)], [50] * 200)  # becomes the reference
        mon.observe([[v] for v in RNG.normal(0, 1, 200)], [50] * 200)
        before = await mon.refresh()
        mon.observe([[v] for v in RNG.normal(1.2, 1, 200)], [50] * 200)
        after = await mon.refresh()
        return before, after

    before, after = asyncio.run(run())
    b, a = before["heads"]["LABEL_0"], after["heads"]["LABEL_0"]
    assert b["reference_n"] == 200 and b["current_n"] == 200
    # below the alert thresholds (deploy/prometheus/rules.yml: PSI 0.25, KS 0.3) despite sampling noise
    assert b["psi"] < 0.25 and b["ks"] < 0.2 and abs(b["mean_shift"]) < 0.3
    assert a["psi"] > 0.25 and a["ks"] > 0.3 and a["mean_shift"] > 0.8
    assert _gauge(metrics, "rewardserve_drift_psi") == pytest.approx(a["psi"])
    assert _gauge(metrics, "rewardserve_drift_ks") == pytest.approx(a["ks"])
    assert _gauge(metrics, "rewardserve_reward_window_mean") == pytest.approx(a["mean"])
    assert sum(a["histogram"]["reference"]) == 200 and sum(a["histogram"]["current"]) == 200


def test_length_reward_correlation_catches_longer_is_better():
    mon, metrics = _monitor()
    lengths = RNG.integers(20, 400, 200)

    async def run(rewards):
        mon.observe([[float(r)] for r in rewards], lengths.tolist())
        return (await mon.refresh())["heads"]["LABEL_0"]["length_correlation"]

    honest = asyncio.run(run(RNG.normal(0, 1, 200)))
    hacked = asyncio.run(run(lengths * 0.01 + RNG.normal(0, 0.5, 200)))
    assert abs(honest) < 0.2 and hacked > 0.6
    assert _gauge(metrics, "rewardserve_hacking_length_correlation") == pytest.approx(hacked)


def test_group_variance_collapse_clip_share_and_disagreement():
    mon, metrics = _monitor(reward_clip_low=-1.0, reward_clip_high=1.0)

    async def run(rows, groups, spreads=None):
        mon.observe(rows, [10] * len(rows), groups, spreads)
        return await mon.refresh()

    spread_out = asyncio.run(run([[-2.0], [0.0], [2.0], [0.5]], [[0, 1, 2]], [0.3, 0.3, 0.3, 0.3]))
    assert spread_out["heads"]["LABEL_0"]["group_std"] == pytest.approx(np.std([-2.0, 0.0, 2.0]))
    assert spread_out["heads"]["LABEL_0"]["clip_share"] == pytest.approx(0.5)
    assert spread_out["disagreement"] == pytest.approx(0.3)
    for _ in range(50):  # the policy collapses: every group gets the same reward
        collapsed = asyncio.run(run([[0.1], [0.1], [0.1]], [[0, 1, 2]]))
    assert collapsed["heads"]["LABEL_0"]["group_std"] < 0.1
    assert _gauge(metrics, "rewardserve_hacking_group_std") < 0.1
    assert metrics.registry.get_sample_value("rewardserve_hacking_disagreement", {"model": "m"}) == pytest.approx(0.3)


def test_reference_from_file(tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(RNG.normal(5, 1, 50).tolist()))
    mon, _ = _monitor(drift_reference_file=str(ref))
    mon.observe([[v] for v in RNG.normal(0, 1, 50)], [1] * 50)
    report = asyncio.run(mon.refresh())["heads"]["LABEL_0"]
    assert report["reference_n"] == 50 and report["mean_shift"] < -3
    bad = tmp_path / "bad.json"
    bad.write_text("[1.0]")
    with pytest.raises(ValueError, match="at least 2"):
        _monitor(drift_reference_file=str(bad))
    # a registry serves several entries: a flat file is the default entry's; {"models": ...} names entries
    assert _monitor(False, drift_reference_file=str(ref))[0].reference is None
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"models": {"m": {"LABEL_0": [1.0, 2.0, 3.0]}, "other": [9.0, 9.5]}}))
    for default in (True, False):
        assert _monitor(default, drift_reference_file=str(named))[0].reference.tolist() == [[1.0], [2.0], [3.0]]
    named.write_text(json.dumps({"models": {"other": [9.0, 9.5]}}))
    assert _monitor(True, drift_reference_file=str(named))[0].reference is None


def test_admin_drift_endpoints(tiny_ckpt):
    settings = quick(model=str(tiny_ckpt("llama")), drift_window=20, drift_reference_size=20, max_wait_ms=1,
                     monitor_interval_s=0.2)
    with serve(*settings) as s, s.client() as c:
        assert c.post("/admin/drift/reference").status_code == 422  # nothing observed yet
        c.post("/v1/score", json={"items": [{"text": f"item {i} " * (1 + i % 7)} for i in range(30)]})
        report = c.get("/admin/drift").json()["models"][s.name]
        head = report["heads"]["LABEL_0"]
        assert head["reference_n"] == 20 and head["current_n"] == 20
        assert {"psi", "ks", "mean_shift", "length_correlation", "quantiles", "histogram"} <= set(head)
        r = c.post("/admin/drift/reference")
        assert r.status_code == 200 and r.json()["reference_n"] == 20
        frozen = c.get("/admin/drift").json()["models"][s.name]["heads"]["LABEL_0"]
        assert frozen["ks"] == 0.0  # reference == current right after freezing
        text = c.get("/metrics").text
        assert 'rewardserve_reward_bucket{' in text and "rewardserve_drift_psi{" in text
        assert "rewardserve_tokenize_duration_seconds_count" in text


def test_monitoring_can_be_turned_off(tiny_ckpt):
    with serve(*quick(model=str(tiny_ckpt("llama")), monitoring=False, max_wait_ms=1)) as s, s.client() as c:
        assert c.post("/v1/score", json={"items": [{"text": "x"}]}).status_code == 200
        r = c.get("/admin/drift")
        assert r.status_code == 404 and r.json()["error"]["type"] == "monitoring_off"
        assert "rewardserve_reward_bucket" not in c.get("/metrics").text
