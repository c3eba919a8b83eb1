"""Ensembles: several reward models score every item; their rewards are aggregated into one.

Members may differ in architecture and tokenizer: each scores the items itself, through its own
queue and cache, concurrently, so a member's cached score serves the ensemble and direct requests
alike. Aggregations (Reward Model Ensembles Help Mitigate Overoptimization):

    mean    mean of the member rewards
    min     the worst case
    uwo     mean - lambda * variance (population variance across members)
    median  the middle value (mean of the two middle ones for an even count)

With `normalize`, each member's reward r is first standardised, (r - mean_m) / std_m, with the
member's statistics from the entry (members trained apart have different scales). Each item also
reports its members' raw rewards and their `disagreement`: the population standard deviation of
the values that were aggregated, which feeds `rewardserve_hacking_disagreement`.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from rewardserve.config import EnsembleEntry
from rewardserve.errors import InvalidInput
from rewardserve.models.tokenize import ItemLike
from rewardserve.scorers.base import Call, Result, Scorer
from rewardserve.scorers.combined import Combination


def aggregate(values: list[float], how: str, lam: float | None = None) -> float:
    if how == "mean":
        return statistics.fmean(values)
    if how == "min":
        return min(values)
    if how == "median":
        return statistics.median(values)
    if how == "uwo":
        return statistics.fmean(values) - lam * statistics.pvariance(values)
    raise ValueError(f"unknown aggregate {how!r}")


class EnsembleScorer(Combination):
    kind = "ensemble"
    part = "member"

    def __init__(self, entry: EnsembleEntry, members: list[Scorer]):
        self.entry = entry
        self.name = entry.name
        self.members = members
        self.labels = ["reward"]

    def _standardise(self, name: str, reward: float) -> float:
        if not self.entry.normalize:
            return reward
        s = self.entry.stats[name]
        return (reward - s.mean) / s.std

    async def score(self, items: Sequence[ItemLike], call: Call) -> list[Result]:
        if call.heads is not None:
            raise InvalidInput(f"heads: {self.name} is an ensemble; heads apply to model entries (set them on its "
                               "members' entries)", field="heads")
        per_member = await self.score_parts({m.name: m for m in self.members}, items, call)
        results = []
        for i in range(len(items)):
            mine = [r[i] for r in per_member]
            raw = {m.name: r.reward for m, r in zip(self.members, mine)}
            values = [self._standardise(name, r) for name, r in raw.items()]
            results.append(Result(
                reward=aggregate(values, self.entry.aggregate, self.entry.lambda_), tokens=sum(r.tokens for r in mine),
                truncated=any(r.truncated for r in mine), cached=all(r.cached for r in mine), members=raw,
                disagreement=statistics.pstdev(values),
            ))
        if self.monitor is not None:
            self.monitor.observe([[r.reward] for r in results], [r.tokens for r in results], call.groups,
                                 spreads=[r.disagreement for r in results])
        return results

    def card(self) -> dict[str, Any]:
        e = self.entry
        return dict(id=self.name, kind=self.kind, members=e.members, aggregate=e.aggregate, **{"lambda": e.lambda_},
                    normalize=e.normalize)
