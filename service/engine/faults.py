"""Keeping a batch's failure small.

- Out of memory: the batch is retried in halves, recursively, down to single units; only a unit
  that cannot run even alone fails. (The device's memory is freed between tries.)
- Any other exception fails the batch's own units, and no others.
- An error that means the device itself is gone (a CUDA error that poisons the context) is told
  apart, so the device can be taken out of service: no later batch can succeed on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rewardserve.errors import bug
from rewardserve.models.units import Unit

_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")
_LOST_TEXT = ("illegal memory access", "device-side assert", "unspecified launch failure", "uncorrectable ecc",
              "device not ready", "device is no longer available", "cuda error: unknown error")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def is_device_lost(exc: BaseException) -> bool:
    return not is_oom(exc) and any(t in str(exc).lower() for t in _LOST_TEXT)


@dataclass
class Outcome:
    results: list  # per unit: its rows, or the exception that failed it
    computed: int = 0  # positions the device computed
    real: int = 0  # real tokens
    splits: int = 0  # times a batch was halved after running out of memory
    seconds: float | None = None  # the device's own time (engine processes measure it), else None
    saved: int = 0  # tokens not computed because items' shared beginnings ran once


def run_splitting(score: Callable, units: list[Unit]) -> Outcome:
    """`score(units)` (a backend's), halving the batch on out-of-memory until what fails, fails alone."""
    try:
        out = score(units)
    except Exception as exc:
        if not is_oom(exc):
            return Outcome([exc] * len(units))
        free_device_memory()
        if len(units) == 1:
            return Outcome([exc])
        half = len(units) // 2
        a, b = run_splitting(score, units[:half]), run_splitting(score, units[half:])
        seconds = None if a.seconds is None or b.seconds is None else a.seconds + b.seconds
        return Outcome(a.results + b.results, a.computed + b.computed, a.real + b.real, a.splits + b.splits + 1,
                       seconds, a.saved + b.saved)
    rows, start, results = out.scores.tolist(), 0, []
    for u in units:
        results.append(rows[start: start + u.rows])
        start += u.rows
    if start != len(rows):
        raise bug(f"backend returned {len(rows)} rows for {start} expected.")
    return Outcome(results, out.computed_positions, out.real_tokens, seconds=out.seconds, saved=out.saved_tokens)


def free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
