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
from rewardserve.engine.types import Lane, Ticket
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
        super().__init__(model, runner, metrics, truncation)
        self.labels = model.labels
        self.heads = heads
        self.fingerprint = fingerprint

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

    async def warmup(self) -> list[float]:
        """One batch per device (every replica pays its first-call costs before traffic arrives);
        the rewards of the sample texts fit the reward histogram's buckets."""
        enc = self.model.encoder
        ids = [(enc.tokenizer(t, add_special_tokens=True)["input_ids"] or [0])[: enc.max_length] for t in WARMUP_TEXTS]
        pad = self.model.pad_token_id
        seqs = [Prepared(x, (last_token_index(x, pad),)) for x in ids]
        # one batch (one max_wait_ms) per device; in parts if the operator's queue limit is smaller
        parts = [seqs] if sum(len(x) for x in ids) <= self.runner.batcher.max_queued else [[s] for s in seqs]
        rewards: list[float] = []
        for _ in self.model.backends:  # consecutive batches go to the least recently used device
            rewards = []
            for part in parts:
                runs = await self.runner.run(part, lane=Lane.interactive, ticket=Ticket(), use_cache=False)
                rewards += [rows[0][0] for rows, _ in runs]
        return rewards

    def card(self) -> dict[str, Any]:
        m = self.model
        return dict(
            id=m.name, kind=self.kind, source=m.source, architecture=m.architecture, num_labels=m.num_labels,
            labels=m.labels, heads=self.heads, max_length=m.max_length, dtype=str(m.dtype).removeprefix("torch."),
            devices=m.devices, backend=m.backend, attention=m.attention, fingerprint=self.fingerprint,
        )


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
