"""The engine: a loaded model, its workers and the batcher, behind one `score` call.

The HTTP routes and the offline `rewardserve score` command both go through `Engine.score`, so
there is one path from token ids to rewards.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Sequence

from service.config import Settings
from service.engine.batcher import Batcher
from service.engine.types import Lane, Ticket
from service.engine.workers import WorkerPool
from service.errors import NotReady
from service.models.loading import LoadedModel, load_model
from service.models.tokenize import Encoded, ItemLike
from service.monitoring.metrics import Metrics

log = logging.getLogger(__name__)

# Requests with fewer items are tokenised on the event loop: a thread hop costs more than encoding them.
_INLINE_TOKENIZE_ITEMS = 8


@dataclass(slots=True)
class ScoredItem:
    scores: list[float]  # one per head (num_labels)
    tokens: int
    truncated: bool
    cached: bool = False

    @property
    def reward(self) -> float:
        return self.scores[0]


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.model: LoadedModel | None = None
        self.pool: WorkerPool | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.load_error: BaseException | None = None

    @property
    def name(self) -> str:
        return self.settings.model_name

    async def start(self) -> None:
        """Load the model off the event loop, start the batcher, warm up; then mark ready."""
        try:
            self.model = await asyncio.to_thread(load_model, self.settings)
            self.pool = WorkerPool(self.model.backends, self.metrics, self.name)
            self.batcher = Batcher(self.settings, self.pool, self.metrics, self.name)
            self.batcher.start()
            if self.settings.warmup:
                await self._warmup()
        except BaseException as exc:
            self.load_error = exc
            log.exception("model failed to load")
            raise
        self.ready = True
        self.metrics.ready.labels(self.name).set(1)

    async def _warmup(self) -> None:
        enc = self.model.encoder
        sample = enc.tokenizer("warm up", add_special_tokens=True)["input_ids"] or [0]
        # one batch per worker: every replica pays its first-call costs before traffic arrives
        for _ in self.model.backends:
            await self.score_ids([sample[: enc.max_length]], Lane.interactive, Ticket())

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.pool is not None:
            await self.pool.close()
        self.ready = False

    def _require(self) -> LoadedModel:
        if self.model is None or self.batcher is None:
            raise NotReady("model is still loading; poll /readyz")
        return self.model

    async def encode(self, items: Sequence[ItemLike], truncation: str) -> list[Encoded]:
        enc = self._require().encoder
        if len(items) < _INLINE_TOKENIZE_ITEMS:
            return enc.encode(items, truncation)
        return await asyncio.to_thread(enc.encode, items, truncation)

    async def score_ids(self, seqs: list[list[int]], lane: Lane, ticket: Ticket) -> list[list[float]]:
        """Score token-id sequences; raises typed errors (429 overload, 503 backend)."""
        self._require()
        futures = self.batcher.submit(seqs, lane, ticket)
        try:
            return await asyncio.gather(*futures)
        except BaseException:
            ticket.cancel()  # a failed or cancelled request drops its items that have not run
            for f in futures:
                f.cancel()
            raise

    async def score_items(
        self, items: Sequence[ItemLike], *, truncation: str, lane: Lane, ticket: Ticket
    ) -> list[ScoredItem]:
        encoded = await self.encode(items, truncation)
        rows = await self.score_ids([e.ids for e in encoded], lane, ticket)
        return [ScoredItem(row, len(e.ids), e.truncated) for e, row in zip(encoded, rows)]
