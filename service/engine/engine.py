"""The engine: a loaded model, its workers and the batcher, behind one `score` call.

The HTTP routes and the offline `rewardserve score` command both go through `Engine.score`, so
there is one path from token ids to rewards.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Sequence

from service.config import Settings
from service.engine.batcher import Batcher
from service.cache.keys import KeyMaker, model_fingerprint
from service.cache.lru import LRU
from service.cache.redis_tier import RedisTier
from service.cache.tiered import ScoreCache
from service.engine.types import Lane, Ticket, WorkItem
from service.engine.workers import WorkerPool
from service.errors import NotReady, bug
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
        self.cache: ScoreCache | None = None
        self.keys: KeyMaker | None = None
        self.fingerprint: str | None = None
        self._inflight: dict[bytes, WorkItem] = {}

    @property
    def name(self) -> str:
        return self.settings.model_name

    async def start(self) -> None:
        """Load the model off the event loop, start the batcher, warm up; then mark ready."""
        try:
            self.model = await asyncio.to_thread(load_model, self.settings)
            self.cache = await asyncio.to_thread(self._build_cache)
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

    def _build_cache(self) -> ScoreCache | None:
        s, m = self.settings, self.model
        if not s.lru_items and not s.redis_url:
            return None
        self.fingerprint = model_fingerprint(m.model_dir)
        # everything besides the weights and the ids that decides a score goes into the key
        scoring = f"dtype={m.dtype};backend={m.backend};labels={m.num_labels}"
        self.keys = KeyMaker(self.fingerprint, scoring, s.cache_prefix)
        lru = LRU(s.lru_items) if s.lru_items else None
        redis = None
        if s.redis_url:
            redis = RedisTier(
                s.redis_url, password=s.redis_password, ttl=s.cache_ttl, timeout=s.cache_timeout_ms / 1000,
                metrics=self.metrics, model=self.name, breaker_failures=s.cache_breaker_failures,
                breaker_cooldown=s.cache_breaker_cooldown_s,
            )
        return ScoreCache(lru, redis, m.num_labels, self.metrics, self.name)

    async def _warmup(self) -> None:
        enc = self.model.encoder
        sample = enc.tokenizer("warm up", add_special_tokens=True)["input_ids"] or [0]
        # one batch per worker: every replica pays its first-call costs before traffic arrives
        for _ in self.model.backends:
            await self.score_ids([sample[: enc.max_length]], Lane.interactive, Ticket(), use_cache=False)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.pool is not None:
            await self.pool.close()
        if self.cache is not None:
            await self.cache.close()
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

    async def score_ids(
        self, seqs: list[list[int]], lane: Lane, ticket: Ticket, use_cache: bool = True
    ) -> list[tuple[list[float], bool]]:
        """(scores, cached) per sequence. Raises typed errors (429 overload, 503 backend).

        With the cache on: hits come from the LRU or Redis; an item identical to one already being
        computed (by this request or another) joins that computation (single-flight); the rest are
        queued, and their scores are stored when they complete.
        """
        self._require()
        if not use_cache or self.cache is None:
            rows = await self._wait(self.batcher.submit(seqs, lane, ticket), ticket)
            return [(row, False) for row in rows]
        keys = [self.keys.key(s) for s in seqs]
        found = await self.cache.lookup(keys)
        waiting: dict[bytes, WorkItem | None] = {}
        new: list[int] = []
        for i, key in enumerate(keys):
            if found[i] is not None or key in waiting:
                continue
            running = self._inflight.get(key)
            if running is not None and not running.future.done():
                running.tickets.append(ticket)
                waiting[key] = running
                self.metrics.singleflight_shared.labels(self.name).inc()
            else:
                waiting[key] = None
                new.append(i)
        if new:
            for i, item in zip(new, self.batcher.submit([seqs[i] for i in new], lane, ticket)):
                waiting[keys[i]] = item
                self._inflight[keys[i]] = item
                item.future.add_done_callback(functools.partial(self._settle, keys[i], item))
        rows = dict(zip(waiting, await self._wait(list(waiting.values()), ticket)))
        return [(found[i], True) if found[i] is not None else (rows[k], False) for i, k in enumerate(keys)]

    def _settle(self, key: bytes, item: WorkItem, future: asyncio.Future) -> None:
        if self._inflight.get(key) is item:
            del self._inflight[key]
        if not future.cancelled() and future.exception() is None:
            self.cache.store(key, future.result())

    @staticmethod
    async def _wait(items: list[WorkItem], ticket: Ticket) -> list[list[float]]:
        """Wait for items without cancelling them: another request may share them (single-flight)."""
        if not items:
            return []
        futures = [it.future for it in items]
        try:
            await asyncio.wait(futures)
        except asyncio.CancelledError:
            ticket.cancel()  # our client left: items nobody else waits for are dropped before compute
            raise
        for f in futures:
            if f.cancelled():
                ticket.cancel()
                raise bug("an item was dropped while its request still waited for it.")
            if f.exception() is not None:
                ticket.cancel()  # the rest of this request is moot; drop what has not run
                raise f.exception()
        return [f.result() for f in futures]

    async def score_items(
        self, items: Sequence[ItemLike], *, truncation: str, lane: Lane, ticket: Ticket, use_cache: bool = True
    ) -> list[ScoredItem]:
        encoded = await self.encode(items, truncation)
        rows = await self.score_ids([e.ids for e in encoded], lane, ticket, use_cache)
        return [ScoredItem(row, len(e.ids), e.truncated, cached) for e, (row, cached) in zip(encoded, rows)]
