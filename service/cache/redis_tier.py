"""The shared tier: Redis through redis-py's asyncio client, fail-open.

Every call has a deadline (`timeout`); any error, timeout or garbage is a miss, never a failed
request. A circuit breaker stops calling a Redis that keeps failing and lets one probe through after
`cooldown` seconds: success closes it again, failure re-opens it. Writes run in the background so a
miss never waits for Redis twice.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from rewardserve.monitoring.metrics import Metrics

log = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
_MAX_PENDING_WRITES = 256  # beyond this, writes are skipped (counted): a slow Redis must not pile up tasks


class Breaker:
    def __init__(self, failures: int, cooldown: float):
        self.failures_to_open = failures
        self.cooldown = cooldown
        self.state = CLOSED
        self._failures = 0
        self._opened_at = 0.0

    def allow(self) -> bool:
        if self.state == OPEN and time.monotonic() - self._opened_at >= self.cooldown:
            self.state = HALF_OPEN  # let exactly this call probe
            return True
        return self.state == CLOSED

    def success(self) -> None:
        self.state, self._failures = CLOSED, 0

    def failure(self) -> None:
        self._failures += 1
        if self.state == HALF_OPEN or self._failures >= self.failures_to_open:
            self.state, self._opened_at = OPEN, time.monotonic()


class RedisTier:
    """One connection pool and one breaker for the process; metrics carry the model each call is for."""

    def __init__(self, url: str, *, password: str | None, ttl: int, timeout: float, metrics: Metrics,
                 breaker_failures: int = 3, breaker_cooldown: float = 2.0):
        kwargs = {"password": password} if password else {}
        self.client = aioredis.Redis.from_url(
            url, socket_timeout=max(timeout, 0.05), socket_connect_timeout=max(timeout, 0.05),
            health_check_interval=0, max_connections=64, **kwargs,
        )
        self.ttl = ttl
        self.timeout = timeout
        self.breaker = Breaker(breaker_failures, breaker_cooldown)
        self.metrics = metrics
        self.models: list[str] = []
        self._writes: set[asyncio.Task] = set()

    async def warm(self, connections: int = 4, timeout: float = 2.0) -> bool:
        """Open and check a few pooled connections before traffic: a cold connection can take longer
        than the per-call deadline, and every first request would then miss. Fail-open like the rest."""
        try:
            await asyncio.wait_for(asyncio.gather(*(self.client.ping() for _ in range(connections))), timeout)
        except Exception as exc:
            log.warning("redis is not reachable at start (%s: %s); the cache tier starts as misses",
                        type(exc).__name__, exc)
            return False
        return True

    def register(self, model: str) -> None:
        """A model whose scores go through this tier (the breaker's gauge is published for each)."""
        self.models.append(model)
        self._publish_state()

    def _publish_state(self) -> None:
        for model in self.models:
            self.metrics.cache_breaker_state.labels(model).set(self.breaker.state)

    async def _call(self, op: str, model: str, coro_fn):
        """Run one Redis round trip under the deadline and the breaker; None on any failure."""
        if not self.breaker.allow():
            self._publish_state()
            return None
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(coro_fn(), self.timeout)
        except Exception as exc:  # fail-open: connection refused, timeout, protocol garbage, auth...
            kind = "timeout" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else type(exc).__name__
            self.metrics.cache_errors.labels(model, kind).inc()
            self.breaker.failure()
            self._publish_state()
            log.debug("redis %s failed: %r", op, exc)
            return None
        finally:
            self.metrics.cache_duration.labels(model, "redis", op).observe(time.perf_counter() - start)
        self.breaker.success()
        self._publish_state()
        return result

    async def mget(self, keys: list[bytes], model: str) -> list[bytes | None]:
        result = await self._call("get", model, lambda: self.client.mget(keys))
        if not isinstance(result, list) or len(result) != len(keys):
            return [None] * len(keys)
        return result

    def set_many_background(self, pairs: list[tuple[bytes, bytes]], model: str) -> None:
        if not pairs:
            return
        if len(self._writes) >= _MAX_PENDING_WRITES:
            self.metrics.cache_errors.labels(model, "write_skipped").inc()
            return
        task = asyncio.get_running_loop().create_task(self._set_many(pairs, model))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _set_many(self, pairs: list[tuple[bytes, bytes]], model: str) -> None:
        async def run():
            pipe = self.client.pipeline(transaction=False)
            for key, value in pairs:
                pipe.set(key, value, ex=self.ttl)
            return await pipe.execute()

        await self._call("set", model, run)

    async def flush_writes(self) -> None:
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def close(self) -> None:
        await self.flush_writes()
        try:
            await self.client.aclose()
        except Exception:  # closing a dead connection pool must not fail shutdown
            pass
