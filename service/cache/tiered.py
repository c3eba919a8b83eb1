"""The two-tier score cache: the in-process LRU first, then Redis; both optional.

One `ScoreCache` per process holds the tiers; each model scores through its own `ModelCache` view,
whose keys are namespaced by that model's fingerprint and scoring configuration (so models never
see each other's entries) and whose metrics carry its name. A value is an item's output rows: one
row per pooled position, one float per head.
"""

from __future__ import annotations

import asyncio
import time

from rewardserve.cache.keys import KeyMaker, decode_scores, encode_scores
from rewardserve.cache.lru import LRU
from rewardserve.cache.redis_tier import RedisTier
from rewardserve.monitoring.metrics import Metrics

Rows = list[list[float]]


class ScoreCache:
    def __init__(self, lru: LRU | None, redis: RedisTier | None, metrics: Metrics):
        self.lru = lru
        self.redis = redis
        self.metrics = metrics
        self._to_write: list[tuple[bytes, bytes, str]] = []

    def for_model(self, name: str, keys: KeyMaker, num_labels: int) -> "ModelCache":
        if self.redis is not None:
            self.redis.register(name)
        return ModelCache(self, name, keys, num_labels)

    def write(self, key: bytes, rows: Rows, model: str) -> None:
        """Remember one item's rows. Redis writes of one loop step (a whole batch completes in one)
        are gathered into a single pipelined round trip."""
        if self.lru is not None:
            self.lru.put(key, rows)
        if self.redis is not None:
            if not self._to_write:
                asyncio.get_running_loop().call_soon(self._flush)
            self._to_write.append((key, encode_scores([v for row in rows for v in row]), model))

    def _flush(self) -> None:
        pending, self._to_write = self._to_write, []
        by_model: dict[str, list[tuple[bytes, bytes]]] = {}
        for key, value, model in pending:
            by_model.setdefault(model, []).append((key, value))
        for model, pairs in by_model.items():
            self.redis.set_many_background(pairs, model)

    async def close(self) -> None:
        """Hand Redis what is still waiting to be written, wait for it, and close."""
        if self.redis is not None:
            if self._to_write:
                self._flush()
            await self.redis.close()


class ModelCache:
    """One model's view of the tiers."""

    def __init__(self, tiers: ScoreCache, name: str, keys: KeyMaker, num_labels: int):
        self.tiers = tiers
        self.name = name
        self.keys = keys
        self.num_labels = num_labels

    def key(self, ids: list[int]) -> bytes:
        return self.keys.key(ids)

    async def lookup(self, keys: list[bytes], rows: list[int]) -> list[Rows | None]:
        """Each key's rows (`rows[i]` of them), or None; garbage or a value of another shape is a miss."""
        found: list[Rows | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        lru, redis, m = self.tiers.lru, self.tiers.redis, self.tiers.metrics
        if lru is not None:
            start = time.perf_counter()
            missing = []
            for i, k in enumerate(keys):
                found[i] = lru.get(k)
                if found[i] is None:
                    missing.append(i)
            self._count("lru", len(keys) - len(missing), len(missing))
            m.cache_duration.labels(self.name, "lru", "get").observe(time.perf_counter() - start)
        if redis is not None and missing:
            raw = await redis.mget([keys[i] for i in missing], self.name)
            hits = 0
            k = self.num_labels
            for i, value in zip(missing, raw):
                flat = decode_scores(value, rows[i] * k)
                if flat is not None:
                    found[i] = [flat[r * k: (r + 1) * k] for r in range(rows[i])]
                    hits += 1
                    if lru is not None:
                        lru.put(keys[i], found[i])  # promote: the next hit stays in process
            self._count("redis", hits, len(missing) - hits)
        return found

    def store(self, key: bytes, rows: Rows) -> None:
        self.tiers.write(key, rows, self.name)

    def _count(self, tier: str, hits: int, misses: int) -> None:
        m = self.tiers.metrics
        if hits:
            m.cache_hits.labels(self.name, tier).inc(hits)
        if misses:
            m.cache_misses.labels(self.name, tier).inc(misses)
