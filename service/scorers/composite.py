"""Hybrid rewards: components (any other entries) combined by an expression, declaratively.

Every component scores the items concurrently, each through its own queue and cache (a component's
cached score serves the composite and direct requests alike). Then, per item:

1. each component's transform (if the composite sets one) shapes its value, baselines included (the
   component entries' own default transforms do not apply: a composite sees their raw scores);
2. gates: a gated component counts 0 unless the component it is gated on reaches `at_least`
   (Stabilizing Long-term Multi-turn RL with Gated Rewards); gates read the shaped values;
3. the total is the entry's expression over the values (scorers/expression.py);
4. thresholds: each thresholded component reports whether its value reaches its threshold
   (Confronting Reward Model Overoptimization with Constrained RLHF).

Each item carries `components` (the values the total was computed from, gates applied), `gated`,
`passed`, and the verifier components' `reasons`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from rewardserve.entries import CompositeEntry
from rewardserve.errors import InvalidInput
from rewardserve.models.tokenize import ItemLike
from rewardserve.scorers.base import Call, Result, Scorer
from rewardserve.scorers.combined import Combination
from rewardserve.scorers.expression import compile_total


class CompositeScorer(Combination):
    kind = "composite"
    part = "component"

    def __init__(self, entry: CompositeEntry, components: dict[str, Scorer]):
        self.entry = entry
        self.name = entry.name
        self.components = components
        self.total = compile_total(entry.total, set(components))
        self.labels = ["reward", *components]
        self.uses_reference = any(c.uses_reference for c in components.values())

    async def score(self, items: Sequence[ItemLike], call: Call) -> list[Result]:
        if call.heads is not None:
            raise InvalidInput(f"heads: {self.name} is a composite; heads apply to model entries", field="heads")
        names = list(self.components)
        scored = await self.score_parts(self.components, items, call, self.entry.transforms)
        gates, thresholds = self.entry.gates, self.entry.thresholds
        results = []
        for i in range(len(items)):
            mine = {n: r[i] for n, r in zip(names, scored)}
            values = {n: r.reward for n, r in mine.items()}
            gated = [n for n, g in gates.items() if values[g.on] < g.at_least]
            for n in gated:
                values[n] = 0.0
            try:
                total = self.total(values)
            except (ZeroDivisionError, OverflowError) as exc:
                raise InvalidInput(f"{self.name}'s total {self.entry.total!r} is undefined for this item ({exc}) "
                                   f"with components {values}", index=i) from None
            if not math.isfinite(total):
                raise InvalidInput(f"{self.name}'s total {self.entry.total!r} is {total} for this item with "
                                   f"components {values}", index=i)
            reasons = {n: r.reason for n, r in mine.items() if r.reason is not None}
            results.append(Result(
                reward=total, tokens=sum(r.tokens for r in mine.values()),
                truncated=any(r.truncated for r in mine.values()), cached=all(r.cached for r in mine.values()),
                components=values, gated=gated if gates else None,
                passed={n: values[n] >= t for n, t in thresholds.items()} or None, reasons=reasons or None,
            ))
        if self.monitor is not None:
            self.monitor.observe([[r.reward, *r.components.values()] for r in results], [r.tokens for r in results],
                                 call.groups)
        return results

    def card(self) -> dict[str, Any]:
        e = self.entry
        return dict(id=self.name, kind=self.kind, components=e.components, total=e.total,
                    gates={n: g.model_dump() for n, g in e.gates.items()} or None, thresholds=e.thresholds or None,
                    transforms={n: t.model_dump(exclude_none=True) for n, t in e.transforms.items()} or None,
                    needs_reference=self.uses_reference)
