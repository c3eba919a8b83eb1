"""`rewardserve bench overload`: what happens past capacity.

1. Capacity: `concurrency` closed-loop clients send one-item, uncached /v1/score requests for
   `capacity_s` seconds; their rate is the server's capacity for this load.
2. Overload: an open loop offers requests at a rate that ramps from 1x to `peak`x that capacity over
   `ramp_s` seconds, each with a deadline (X-Request-Timeout) of `deadline_s`, whatever the answers;
   `rounds` times, the memory read after each (it must not grow from one round to the next).
Every answer must be a 200, a 429 (queue full, with Retry-After) or the request's own 504; none may
hang past its deadline plus a grace, and every 200 must carry exactly its item's reward (nothing
lost, duplicated or swapped). The server's memory is read before, after and at its peak.
"""

from __future__ import annotations

import asyncio
import statistics

import httpx
import orjson

from rewardserve.bench.http_load import build_request, run_load, run_open
from rewardserve.bench.proc import server_process

MB = 1 << 20
_GRACE_S = 10.0  # an answer later than deadline + this is a hang


def _texts(n: int) -> list[str]:
    return [f"Question {i}: what is {i} + {i % 7}? The answer is {i + i % 7}." for i in range(n)]


def run(model: str | None, capacity_s: float, ramp_s: float, peak: float, deadline_s: float, concurrency: int,
        texts: int, extra_args: list[str] | None = None, rounds: int = 2) -> dict:
    args = (["--model", model] if model else []) + list(extra_args or [])
    corpus = _texts(texts)
    with server_process(args) as served:
        url, host = f"http://127.0.0.1:{served.port}", f"127.0.0.1:{served.port}"
        refs = httpx.post(f"{url}/v1/score", json={"items": [{"text": t} for t in corpus], "cache": False},
                          timeout=600).json()["rewards"]
        bodies = [orjson.dumps({"items": [{"text": t}], "cache": False}) for t in corpus]
        closed = [build_request("POST", "/v1/score", host, b) for b in bodies]
        capacity = asyncio.run(run_load("127.0.0.1", served.port, closed, concurrency=concurrency,
                                        duration=capacity_s)).rps
        rss = [served.rss_bytes()]
        schedule, t, k = [], 0.0, 0
        while t < ramp_s:  # the offered rate rises linearly from capacity to peak x capacity
            rate = capacity * (1 + (peak - 1) * t / ramp_s)
            schedule.append((t, k % texts))
            t, k = t + 1 / rate, k + 1
        timed = {"X-Request-Timeout": f"{deadline_s:g}"}
        requests = [(at, build_request("POST", "/v1/score", host, bodies[i], timed)) for at, i in schedule]
        answers = []
        for _ in range(rounds):  # the same ramp again: memory must not grow from one to the next
            answers += asyncio.run(run_open("127.0.0.1", served.port, requests, timeout=deadline_s + _GRACE_S))
            rss.append(served.rss_bytes())
        rss_peak = served.rss_bytes(peak=True)
        schedule = schedule * rounds
    by_status: dict[str, int] = {}
    wrong = 0
    for (_, i), a in zip(schedule, answers):
        by_status[str(a.status)] = by_status.get(str(a.status), 0) + 1
        if a.status == 200:
            items = orjson.loads(a.body)["items"]
            wrong += len(items) != 1 or abs(items[0]["reward"] - refs[i]) > 1e-5
    ok = [a.latency for a in answers if a.status == 200]
    return {
        "bench": "overload", "capacity_rps": round(capacity, 1), "peak_offered_rps": round(capacity * peak, 1),
        "requests": len(answers), "by_status": by_status, "hung": by_status.get("0", 0),
        "failed": by_status.get("-1", 0), "wrong_or_duplicated": wrong,
        "rounds": rounds, "served_rps": round(len(ok) / (ramp_s * rounds), 1),
        "p50_ms_200": round(statistics.median(ok) * 1000, 1) if ok else None,
        "p99_ms_200": round(sorted(ok)[int(0.99 * (len(ok) - 1))] * 1000, 1) if ok else None,
        "rss_mb": {"before": round(rss[0] / MB), "after_each_round": [round(r / MB) for r in rss[1:]],
                   "peak": round(rss_peak / MB)},
    }
