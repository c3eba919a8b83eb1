"""The reward monitor: drift and reward-hacking signals, computed off the request path.

Scoring only appends to bounded ring buffers (O(1) per item, on the event loop). A background task
snapshots them every `monitor_interval_s`, computes the statistics in a worker thread, and publishes
gauges; `GET /admin/drift` returns the latest report. Per head:

- distribution: a histogram with buckets fitted to the model at warm-up, and rolling mean, std, quantiles;
- drift of the current window against a reference (the first `drift_reference_size` scores, a window
  frozen on demand, or a file): PSI, KS and the standardized mean shift;
- hacking signals: length-reward correlation, mean within-group reward std (variance collapse),
  the share of rewards at the clip bounds (when bounds are set), and ensemble disagreement (the
  rolling mean of the per-item spread, when a scorer reports one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from pathlib import Path

import numpy as np

from rewardserve.aio import cancel_and_wait
from rewardserve.config import ServerSettings
from rewardserve.monitoring import drift
from rewardserve.monitoring.metrics import Metrics

log = logging.getLogger(__name__)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class RewardMonitor:
    """One registry entry's monitor (a model per head, an ensemble on its aggregate reward)."""

    def __init__(self, settings: ServerSettings, metrics: Metrics, model: str, labels: list[str], buckets: list[float],
                 default: bool = True):
        self.s = settings
        self.metrics = metrics
        self.model = model
        self.labels = labels
        self.histogram = metrics.reward_histogram(buckets)
        w = settings.drift_window
        self.window: deque[tuple[tuple[float, ...], int]] = deque(maxlen=w)  # (scores per head, tokens)
        self.group_std: deque[float] = deque(maxlen=w)
        self.spread: deque[float] = deque(maxlen=w)
        self.reference: np.ndarray | None = None  # (n, heads)
        self._pending_reference: list[tuple[float, ...]] = []
        self.report: dict = {}
        self._task: asyncio.Task | None = None
        if settings.drift_reference_file:
            self.load_reference(Path(settings.drift_reference_file), default)

    # -- request path: appends only ----------------------------------------------------------
    def observe(self, rows: list[list[float]], tokens: list[int], groups=(), spreads: list[float] | None = None):
        for row, n in zip(rows, tokens):
            self.window.append((tuple(row), n))
            for head, value in zip(self.labels, row):
                self.histogram.labels(self.model, head).observe(value)
            if self.reference is None:
                self._pending_reference.append(tuple(row))
        if self.reference is None and len(self._pending_reference) >= self.s.drift_reference_size:
            self.reference = np.asarray(self._pending_reference[: self.s.drift_reference_size])
            self._pending_reference = []
        for g in groups:
            if len(g) > 1:
                self.group_std.append(float(np.std([rows[i][0] for i in g])))
        if spreads:
            self.spread.extend(spreads)

    # -- reference control ----------------------------------------------------------------------
    def freeze_reference(self) -> int:
        """Make the current window the reference; returns its size."""
        if not self.window:
            raise ValueError("no scores observed yet: nothing to freeze")
        self.reference = np.asarray([row for row, _ in self.window])
        self._pending_reference = []
        return len(self.reference)

    def load_reference(self, path: Path, default: bool = True) -> None:
        """A JSON list of rewards (one head) or {head_label: [rewards]}, for the default entry; or
        {"models": {entry: either of those}} for the entries it names."""
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            if self.model not in data["models"]:
                return
            data = data["models"][self.model]
        elif not default:
            return
        if isinstance(data, dict):
            cols = [data[label] for label in self.labels]
            self.reference = np.asarray(cols, dtype=float).T
        else:
            self.reference = np.asarray(data, dtype=float).reshape(-1, 1)
        if self.reference.shape[1] != len(self.labels) or len(self.reference) < 2:
            raise ValueError(f"{path}: need at least 2 rewards for each of the heads {self.labels}")

    # -- background computation --------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="rewardserve-monitor")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.s.monitor_interval_s)
            await self.refresh()

    async def refresh(self) -> dict:
        """Snapshot the buffers (on the loop), compute (in a thread), publish."""
        snapshot = (list(self.window), self.reference, list(self.group_std), list(self.spread))
        try:
            self.report = await asyncio.to_thread(self._compute, *snapshot)
        except Exception:  # a monitoring bug must never take scoring down
            log.exception("reward monitor failed")
            return self.report
        self._publish(self.report)
        return self.report

    def _compute(self, window, reference, group_std, spread) -> dict:
        rows = np.asarray([r for r, _ in window], dtype=float).reshape(-1, len(self.labels))
        lengths = np.asarray([n for _, n in window], dtype=float)
        heads = {}
        for h, label in enumerate(self.labels):
            cur = rows[:, h]
            ref = reference[:, h] if reference is not None else np.empty(0)
            entry = {
                "psi": drift.psi(ref, cur), "ks": drift.ks(ref, cur), "mean_shift": drift.mean_shift(ref, cur),
                "reference_n": int(len(ref)), "current_n": int(len(cur)),
                "mean": float(np.mean(cur)) if len(cur) else float("nan"),
                "std": float(np.std(cur)) if len(cur) else float("nan"),
                "quantiles": {str(q): float(np.quantile(cur, q)) if len(cur) else float("nan") for q in QUANTILES},
                "length_correlation": drift.correlation(lengths, cur),
                "group_std": float(np.mean(group_std)) if group_std and h == 0 else float("nan"),
                "histogram": _histograms(ref, cur),
            }
            lo, hi = self.s.reward_clip_low, self.s.reward_clip_high
            if (lo is not None or hi is not None) and len(cur):
                at = np.zeros(len(cur), dtype=bool)
                if lo is not None:
                    at |= cur <= lo
                if hi is not None:
                    at |= cur >= hi
                entry["clip_share"] = float(np.mean(at))
            heads[label] = entry
        return {"model": self.model, "time": time.time(), "heads": heads,
                "disagreement": float(np.mean(spread)) if spread else None}

    def _publish(self, report: dict) -> None:
        m, name = self.metrics, self.model
        for label, e in report["heads"].items():
            m.drift_psi.labels(name, label).set(e["psi"])
            m.drift_ks.labels(name, label).set(e["ks"])
            m.drift_mean_shift.labels(name, label).set(e["mean_shift"])
            m.drift_reference_n.labels(name, label).set(e["reference_n"])
            m.reward_window_mean.labels(name, label).set(e["mean"])
            m.reward_window_std.labels(name, label).set(e["std"])
            for q, v in e["quantiles"].items():
                m.reward_window_quantile.labels(name, label, q).set(v)
            m.length_correlation.labels(name, label).set(e["length_correlation"])
            m.group_std.labels(name, label).set(e["group_std"])
            if "clip_share" in e:
                m.clip_share.labels(name, label).set(e["clip_share"])
        if report["disagreement"] is not None:
            m.disagreement.labels(name).set(report["disagreement"])


def _histograms(reference: np.ndarray, current: np.ndarray, bins: int = 20) -> dict:
    """Reference and current counts over shared edges, for plots (`rewardserve drift`)."""
    both = np.concatenate([reference, current])
    both = both[np.isfinite(both)]
    if len(both) == 0:
        return {"edges": [], "reference": [], "current": []}
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    return {"edges": [float(e) for e in edges],
            "reference": np.histogram(reference, edges)[0].tolist(),
            "current": np.histogram(current, edges)[0].tolist()}
