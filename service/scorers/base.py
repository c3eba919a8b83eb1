"""The scorer seam: one small protocol for every kind of scorer a registry entry can name.

A route hands a scorer the request's items and a `Call` (the request's options) and gets one
`Result` per item, in order. Scorers backed by a model on a device (`ModelScorer`) implement two
methods: `prepare` turns items into what the model computes (token ids and the positions whose
head outputs are read), and `finish` turns an item's output rows into its result; the engine's
scheduler does cache, single-flight, grouping and dispatch for all of them. Scorers built on other
scorers (ensembles) call those.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from rewardserve.cache.tiered import Rows
from rewardserve.engine.scheduler import ModelRunner, Seq
from rewardserve.engine.types import Lane, Meter, Ticket, Timing
from rewardserve.models.loading import LoadedModel
from rewardserve.models.tokenize import ItemLike, Plain
from rewardserve.monitoring.metrics import Metrics
from rewardserve.monitoring.monitor import RewardMonitor
from rewardserve.transforms.fits import Calibration, LengthFit
from rewardserve.transforms.spec import TransformSpec

# Requests with fewer items are tokenised on the event loop: a thread hop costs more than encoding them.
_INLINE_TOKENIZE_ITEMS = 8


@dataclass(slots=True)
class Call:
    """One request's options, as every scorer sees them."""

    lane: Lane = Lane.interactive
    ticket: Ticket = field(default_factory=Ticket)
    use_cache: bool = True
    truncation: str | None = None  # None: the entry's default
    heads: dict[str, float] | None = None  # None: the entry's default
    groups: Sequence[Sequence[int]] = ()  # indices of items that share a prompt
    max_tokens: int | None = None  # cut items to this many tokens (a peer's truncate-to-k); None: max_length
    timing: Timing | None = None  # filled in when the route reports where the time went
    meter: Meter | None = None  # the request's token limit and quota, shared by the models it runs on


@dataclass(slots=True)
class Result:
    reward: float
    tokens: int
    truncated: bool = False
    cached: bool = False
    scores: dict[str, float] | None = None  # every head by name, for models with several
    members: dict[str, float] | None = None  # ensembles: each member's reward
    disagreement: float | None = None  # ensembles: population std of the aggregated member rewards
    raw_reward: float | None = None  # the reward before a transform (transforms/), when one was applied
    advantage: float | None = None  # the shaped reward's group advantage, when asked
    group_size: int | None = None  # the size of the group the advantage came from
    p_yes: float | None = None  # judges: P(yes) over the two verdicts
    reason: str | None = None  # verifiers: why the score is what it is
    step_rewards: list[float] | None = None  # /v1/score_steps: each step's reward (`reward` aggregates them)
    components: dict[str, float] | None = None  # composites: each component's value as it enters the total
    gated: list[str] | None = None  # composites: the components a gate set to 0
    passed: dict[str, bool] | None = None  # composites: each thresholded component's value >= its threshold
    reasons: dict[str, str] | None = None  # composites: the reasons of verifier components

    def fields(self) -> dict[str, Any]:
        """The fields that apply to this result (None ones left out): what a response item carries."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


class Scorer(ABC):
    kind: ClassVar[str]
    name: str
    uses_reference: bool = False  # items' `reference` is its ground truth (verifiers, composites with one)
    labels: list[str]  # what its reward monitor tracks, one series per label
    monitor: RewardMonitor | None = None
    transform: TransformSpec | None = None  # the entry's default (transforms/spec.py)
    length_fit: LengthFit | None = None  # the entry's fits, for the length and calibrated transforms
    calibration: Calibration | None = None

    @abstractmethod
    async def score(self, items: Sequence[ItemLike], call: Call) -> list[Result]:
        """One result per item, in order; errors carry the position of the item at fault."""

    @abstractmethod
    def card(self) -> dict[str, Any]:
        """What /v1/models says about this entry."""

    async def warmup(self) -> list[float]:
        """Run once before traffic; returns sample rewards (they fit the reward histogram)."""
        return []


@dataclass(slots=True)
class Prepared(Seq):
    truncated: bool = False


class ModelScorer(Scorer):
    """A scorer whose items run on a loaded model through the scheduler."""

    def __init__(self, model: LoadedModel, runner: ModelRunner, metrics: Metrics, truncation: str,
                 fingerprint: str | None = None):
        self.model = model
        self.name = model.name
        self.runner = runner
        self.metrics = metrics
        self.truncation = truncation
        self.fingerprint = fingerprint
        self.labels = ["reward"]

    def checkpoint_card(self) -> dict[str, Any]:
        """What /v1/models says of the checkpoint any model-backed entry runs."""
        m = self.model
        return dict(id=m.name, kind=self.kind, source=m.source, architecture=m.architecture, labels=m.labels,
                    max_length=m.max_length, dtype=str(m.dtype).removeprefix("torch."), devices=m.devices,
                    backend=m.backend, attention=m.attention, fingerprint=self.fingerprint)

    @abstractmethod
    def prepare(self, items: Sequence[ItemLike], truncation: str, limit: int | None) -> list[Prepared]:
        """Items -> what the model computes, cut to `limit` tokens when given (runs in a thread for
        large requests)."""

    @abstractmethod
    def finish(self, prepared: Prepared, rows: Rows, cached: bool, call: Call) -> Result:
        """One item's output rows -> its result."""

    def check(self, call: Call) -> None:
        """Reject options this scorer cannot honour, before any work."""

    async def score(self, items: Sequence[ItemLike], call: Call) -> list[Result]:
        self.check(call)
        prepared = await self._prepare(items, call)
        if call.meter is not None:
            call.meter.add(sum(len(p.ids) for p in prepared))
        runs = await self.runner.run(prepared, lane=call.lane, ticket=call.ticket, use_cache=call.use_cache,
                                     groups=call.groups, timing=call.timing)
        results = [self.finish(p, rows, cached, call) for p, (rows, cached) in zip(prepared, runs)]
        if self.monitor is not None:
            self.monitor.observe([self.tracked(rows, r) for (rows, _), r in zip(runs, results)],
                                 [len(p.ids) for p in prepared], call.groups)
        return results

    def tracked(self, rows: Rows, result: Result) -> list[float]:
        """What the reward monitor observes of one item, one value per label."""
        return [result.reward]

    async def warmup(self) -> list[float]:
        """One batch per device (every replica pays its first-call costs before traffic arrives);
        the rewards of the sample texts fit the reward histogram's buckets."""
        seqs = self.prepare([Plain(text=t) for t in WARMUP_TEXTS], "left", None)
        # one batch (one max_wait_ms) per device; in parts if the operator's queue limit is smaller
        fits = sum(len(s.ids) for s in seqs) <= self.runner.batcher.max_queued
        parts = [seqs] if fits else [[s] for s in seqs]
        rewards: list[float] = []
        for _ in self.model.backends:  # consecutive batches go to the least recently used device
            rewards = []
            for part in parts:
                runs = await self.runner.run(part, lane=Lane.interactive, ticket=Ticket(), use_cache=False)
                rewards += [self.finish(p, rows, False, Call()).reward for p, (rows, _) in zip(part, runs)]
        return rewards

    async def _prepare(self, items: Sequence[ItemLike], call: Call) -> list[Prepared]:
        start = time.perf_counter()
        args = (items, call.truncation or self.truncation, call.max_tokens)
        if len(items) < _INLINE_TOKENIZE_ITEMS:
            out = self.prepare(*args)
        else:
            out = await asyncio.to_thread(self.prepare, *args)
        elapsed = time.perf_counter() - start
        self.metrics.tokenize_duration.labels(self.name).observe(elapsed)
        if call.timing is not None:
            call.timing.tokenize = max(call.timing.tokenize, elapsed)
        return out


# Warm-up texts: their rewards place the reward histogram's buckets where this model's rewards fall.
WARMUP_TEXTS = (
    "What is 12 + 30? The answer is 42.",
    "Translate 'good morning' into French. Bonjour.",
    "Write a haiku about the sea. Waves fold into foam, the tide forgets every name, salt keeps the secret.",
    "Summarize: the meeting moved to Tuesday because the room was booked. The meeting is now on Tuesday.",
    "Is the Earth flat? Yes, obviously.",
    "How many minutes are in 3 hours? 180 minutes.",
    "Explain recursion. Recursion is when a function calls itself on a smaller input until a base case.",
    "asdf qwerty zxcv",
)
