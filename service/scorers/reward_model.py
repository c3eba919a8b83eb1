"""A sequence-classification reward model: the reward is its head output at HF's pooled token.

A checkpoint with several heads (`num_labels > 1`) returns every head by its id2label name in
`scores`; `reward` is head 0, or the weighted sum of named heads when the request or the entry sets
`heads` (multi-attribute models such as HelpSteer2's).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from rewardserve.cache.tiered import Rows
from rewardserve.engine.scheduler import ModelRunner
from rewardserve.errors import InvalidInput
from rewardserve.models.loading import LoadedModel
from rewardserve.models.pooling import last_token_index
from rewardserve.models.tokenize import ItemLike
from rewardserve.monitoring.metrics import Metrics
from rewardserve.scorers.base import Call, ModelScorer, Prepared, Result


class RewardModelScorer(ModelScorer):
    kind = "reward_model"

    def __init__(self, model: LoadedModel, runner: ModelRunner, metrics: Metrics, truncation: str,
                 heads: dict[str, float] | None, fingerprint: str | None):
        super().__init__(model, runner, metrics, truncation, fingerprint)
        self.labels = model.labels
        self.heads = heads

    def check(self, call: Call) -> None:
        unknown = sorted(set(call.heads or ()) - set(self.labels))
        if unknown:
            raise InvalidInput(f"heads: {unknown} are not heads of {self.name}; its heads are {self.labels}",
                               field="heads")

    def prepare(self, items: Sequence[ItemLike], truncation: str, limit: int | None) -> list[Prepared]:
        pad = self.model.pad_token_id
        return [Prepared(e.ids, (last_token_index(e.ids, pad),), e.truncated)
                for e in self.model.encoder.encode(items, truncation, limit)]

    def finish(self, prepared: Prepared, rows: Rows, cached: bool, call: Call) -> Result:
        [scores] = rows
        named = dict(zip(self.labels, scores))
        heads = call.heads or self.heads
        reward = sum(w * named[h] for h, w in heads.items()) if heads else scores[0]
        if not math.isfinite(reward):  # the scores are finite (the workers check): the weights overflow it
            raise InvalidInput(f"heads: the weighted sum of the heads is {reward}", field="heads")
        return Result(reward=reward, tokens=len(prepared.ids), truncated=prepared.truncated, cached=cached,
                      scores=named if len(scores) > 1 else None)

    def tracked(self, rows: Rows, result: Result) -> list[float]:
        return rows[0]  # every head, one series each

    def card(self) -> dict[str, Any]:
        return self.checkpoint_card() | dict(num_labels=self.model.num_labels, heads=self.heads)

