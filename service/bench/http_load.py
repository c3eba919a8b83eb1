"""A lean HTTP/1.1 load generator for loopback benchmarks.

Written by hand on asyncio streams because the client shares the machine with the server under test:
a general-purpose client (httpx) spends several times more CPU per request than this one, which would
cap the numbers we measure at the client's speed, not the server's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    units: int = 0  # what the measured requests carried (their `sizes`: tokens, say)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def summary(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "rps": round(self.rps, 1),
                "p50_ms": round(self.percentile(0.50) * 1000, 3), "p99_ms": round(self.percentile(0.99) * 1000, 3)}


def build_request(method: str, path: str, host: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def run_load(host: str, port: int, requests: list[bytes], *, concurrency: int, duration: float,
                   warmup: float = 0.5, sizes: list[int] | None = None) -> LoadResult:
    """Closed loop: `concurrency` connections each send the next request as soon as the last answered.
    `sizes[i]`: what request i carries (summed over the answers measured, as LoadResult.units)."""
    latencies: list[float] = []
    errors = units = 0
    stop_at = 0.0
    measure_from = 0.0

    async def connection(worker: int) -> None:
        nonlocal errors, units
        reader, writer = await asyncio.open_connection(host, port)
        i = worker
        try:
            while (now := time.perf_counter()) < stop_at:
                sent = i % len(requests)
                writer.write(requests[sent])
                i += concurrency
                status, _ = await _read_response(reader)
                done = time.perf_counter()
                if measure_from <= done <= stop_at:  # answers in the window; the tail's drain is not steady state
                    latencies.append(done - now)
                    errors += status != 200
                    units += sizes[sent] if sizes and status == 200 else 0
        finally:
            writer.close()

    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    await asyncio.gather(*(connection(w) for w in range(concurrency)))
    return LoadResult(len(latencies), errors, duration, latencies, units)


async def run_all(host: str, port: int, requests: list[bytes], *, concurrency: int,
                  sizes: list[int] | None = None) -> LoadResult:
    """Fixed work: `concurrency` connections share `requests`, each sending the next one left as soon as its
    last answered, until none is left; the time is from the first send to the last answer. For requests so
    large that a time window would hold only a few answers (and its rate would be rounded to whole ones)."""
    latencies: list[float] = []
    errors = units = 0
    left = iter(range(len(requests)))

    async def connection() -> None:
        nonlocal errors, units
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for i in left:
                sent = time.perf_counter()
                writer.write(requests[i])
                status, _ = await _read_response(reader)
                latencies.append(time.perf_counter() - sent)
                errors += status != 200
                units += sizes[i] if sizes and status == 200 else 0
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return LoadResult(len(latencies), errors, time.perf_counter() - start, latencies, units)


@dataclass
class Answer:
    status: int  # 0: no answer within the timeout (the request hung), -1: the connection failed
    body: bytes
    latency: float


async def run_open(host: str, port: int, schedule: list[tuple[float, bytes]], *, timeout: float) -> list[Answer]:
    """Open loop: each request is sent at its time (seconds from the start) whatever the answers so far,
    on an idle keep-alive connection or a new one; answers in schedule order."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one(at: float, request: bytes) -> Answer:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        try:
            reader, writer = idle.pop() if idle else await asyncio.open_connection(host, port)
        except OSError:
            return Answer(-1, b"", 0.0)
        try:
            writer.write(request)
            status, body = await asyncio.wait_for(_read_response(reader), timeout)
        except asyncio.TimeoutError:
            writer.close()
            return Answer(0, b"", time.perf_counter() - sent)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            return Answer(-1, b"", time.perf_counter() - sent)
        idle.append((reader, writer))
        return Answer(status, body, time.perf_counter() - sent)

    start = time.perf_counter()
    answers = await asyncio.gather(*(one(at, request) for at, request in schedule))
    for _, writer in idle:
        writer.close()
    return list(answers)
