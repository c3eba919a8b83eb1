"""Replicas agree: two plain servers of one checkpoint, sharing one real redis-server. A score computed by
one is a cache hit on the other with the identical value, and both compute identical scores on their own
(same weights, dtype and path: what the cache key says), whatever else shares their batches."""

from __future__ import annotations

import asyncio

from rewardserve.config import quick
from tests.redis_helper import RedisProcess
from tests.server import serve


def test_two_servers_sharing_redis_serve_each_others_scores_and_compute_the_same_ones(tiny_ckpt):
    redis = RedisProcess().start()
    try:
        config = quick(model=str(tiny_ckpt("llama")), redis_url=redis.url, lru_items=0, cache_timeout_ms=2000)  # sharing, not deadlines
        items = [{"prompt": f"Question {i}?", "response": "An answer " * (i + 1)} for i in range(6)]
        with serve(*config) as a, serve(*config) as b, a.client() as ca, b.client() as cb:
            first = ca.post("/v1/score", json={"items": items}).json()
            assert [it["cached"] for it in first["items"]] == [False] * 6
            computed = b.metric("rewardserve_tokens_total", model=b.name)  # its warm-up's
            second = cb.post("/v1/score", json={"items": items}).json()
            assert [it["cached"] for it in second["items"]] == [True] * 6
            assert second["rewards"] == first["rewards"]
            assert b.metric("rewardserve_tokens_total", model=b.name) == computed  # b computed nothing more

            # computed on each replica (cache off), amid different batch mates: bit-identical
            fresh = [{"text": f"fresh item {i} " * (3 * i + 1)} for i in range(5)]

            async def concurrently(server, bodies: list[dict]) -> list[dict]:
                async with server.async_client() as c:
                    return [r.json() for r in await asyncio.gather(*(c.post("/v1/score", json=x) for x in bodies))]

            on_a = ca.post("/v1/score", json={"items": fresh, "cache": False}).json()["rewards"]
            mates = [{"items": [{"text": "another request " * 40}], "cache": False}]
            on_b = asyncio.run(concurrently(b, [{"items": fresh[::-1], "cache": False}] + mates))[0]["rewards"]
            assert on_b[::-1] == on_a
    finally:
        redis.kill()
