"""The two-tier score cache: the in-process LRU first, then Redis; both optional."""

from __future__ import annotations

import asyncio
import time

from rewardserve.cache.keys import decode_scores, encode_scores
from rewardserve.cache.lru import LRU
from rewardserve.cache.redis_tier import RedisTier
from rewardserve.monitoring.metrics import Metrics


class ScoreCache:
    def __init__(self, lru: LRU | None, redis: RedisTier | None, num_labels: int, metrics: Metrics, model: str):
        self.lru = lru
        self.redis = redis
        self.num_labels = num_labels
        self.metrics = metrics
        self.model = model
        self._to_write: list[tuple[bytes, bytes]] = []

    async def lookup(self, keys: list[bytes]) -> list[list[float] | None]:
        found: list[list[float] | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        if self.lru is not None:
            start = time.perf_counter()
            missing = []
            for i, k in enumerate(keys):
                found[i] = self.lru.get(k)
                if found[i] is None:
                    missing.append(i)
            self._count("lru", len(keys) - len(missing), len(missing))
            self.metrics.cache_duration.labels(self.model, "lru", "get").observe(time.perf_counter() - start)
        if self.redis is not None and missing:
            raw = await self.redis.mget([keys[i] for i in missing])
            hits = 0
            for i, value in zip(missing, raw):
                scores = decode_scores(value, self.num_labels)
                if scores is not None:
                    found[i] = scores
                    hits += 1
                    if self.lru is not None:
                        self.lru.put(keys[i], scores)  # promote: the next hit stays in process
            self._count("redis", hits, len(missing) - hits)
        return found

    def store(self, key: bytes, value: list[float]) -> None:
        """Remember one computed score. Redis writes of one loop step (a whole batch completes in
        one) are gathered into a single pipelined round trip."""
        if self.lru is not None:
            self.lru.put(key, value)
        if self.redis is not None:
            if not self._to_write:
                asyncio.get_running_loop().call_soon(self._flush)
            self._to_write.append((key, encode_scores(value)))

    def _flush(self) -> None:
        pairs, self._to_write = self._to_write, []
        self.redis.set_many_background(pairs)

    def _count(self, tier: str, hits: int, misses: int) -> None:
        if hits:
            self.metrics.cache_hits.labels(self.model, tier).inc(hits)
        if misses:
            self.metrics.cache_misses.labels(self.model, tier).inc(misses)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()
