"""`rewardserve bench cache`: requests/s and p50/p99 of 100% cache hits through HTTP, beside the same
server's bare /healthz, measured in one run.

Each tier runs in its own server process: `lru` (in-process tier only) and `redis` (LRU off, so every
hit is a Redis round trip); `miss` sends items no request repeats to a server without a cache, so
every item is tokenised and computed (the front end and the engine together). The load generator runs in this process, on the same machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import urllib.request

import orjson

from rewardserve.bench.http_load import build_request, run_load
from rewardserve.bench.proc import redis_process, server_process


def _items(n: int) -> list[dict]:
    return [{"prompt": f"What is {a} + {a + 7}?", "response": f"The answer is {2 * a + 7}."} for a in range(n)]


def _warm(port: int, bodies: list[bytes]) -> None:
    for body in bodies:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200


def _check_all_cached(port: int, body: bytes) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return all(it["cached"] for it in json.loads(r.read())["items"])


def run(model: str | None, tiers: list[str], duration: float, concurrency: int, items_per_request: int,
        redis_url: str | None) -> dict:
    host = "127.0.0.1"
    def requests(n: int) -> tuple[list[bytes], list[bytes]]:
        items = _items(n)
        bodies = [orjson.dumps({"items": items[i: i + items_per_request]})
                  for i in range(0, len(items) - items_per_request + 1, items_per_request)]
        return bodies, [build_request("POST", "/v1/score", host, b) for b in bodies]

    health_reqs = [build_request("GET", "/healthz", host)]
    results = []
    for name in tiers:  # "lru", "redis", "miss", or e.g. "lru-nomon" (that tier with the reward monitor off)
        tier = name.removesuffix("-nomon")
        # misses: more distinct items than any run gets through, so none repeats
        bodies, score_reqs = requests(items_per_request * 100_000 if tier == "miss" else 256)
        with contextlib.ExitStack() as stack:
            args = ["--model", model] if model else []
            if name.endswith("-nomon"):
                args.append("--no-monitoring")
            if tier == "lru":
                args += ["--lru-items", "100000"]
            elif tier == "miss":
                args += ["--lru-items", "0"]
            else:
                url = redis_url or stack.enter_context(redis_process())
                args += ["--lru-items", "0", "--redis-url", url, "--cache-timeout-ms", "50"]
            port = stack.enter_context(server_process(args)).port
            if tier != "miss":
                _warm(port, bodies)
            if tier != "miss" and not _check_all_cached(port, bodies[0]):
                raise RuntimeError(f"{tier}: warmed items are not served from cache")
            health = asyncio.run(run_load(host, port, health_reqs, concurrency=concurrency, duration=duration))
            hits = asyncio.run(run_load(host, port, score_reqs, concurrency=concurrency, duration=duration))
        row = {"tier": name, "healthz": health.summary(), "score_hits" if tier != "miss" else "score_misses":
               hits.summary(),
               "hit_rps_vs_healthz": round(hits.rps / health.rps, 3) if health.rps else None}
        results.append(row)
        print(f"{name:9s} /healthz {health.rps:8.0f} req/s p50 {row['healthz']['p50_ms']:7.2f} ms "
              f"p99 {row['healthz']['p99_ms']:7.2f} ms | /v1/score {'100% misses' if tier == 'miss' else '100% hits'} "
              f"{hits.rps:8.0f} req/s p50 {hits.percentile(0.5) * 1000:7.2f} ms p99 {hits.percentile(0.99) * 1000:7.2f} ms "
              f"| ratio {row['hit_rps_vs_healthz']}", flush=True)
    return {"bench": "cache", "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": __import__("os").cpu_count(), "concurrency": concurrency,
            "items_per_request": items_per_request, "duration_s": duration, "results": results}
