"""The rewardserve client: `AsyncRewardClient` and its synchronous twin `RewardClient`.

- Long item lists go out as requests of `batch_size` items, at most `concurrency` at a time, and
  come back in input order.
- 429, 502 and 503 answers and connection failures are retried up to `retries` times with
  exponential backoff and jitter; a `Retry-After` header sets the wait (never less than it says).
- A call without an answer within its timeout raises `Timeout` and is not retried (the server may
  still be computing it). Every other failure raises the exception of its kind (errors.py), which
  carries the server's error body.

It imports httpx and the standard library only, so it installs into a training job's environment
without a second torch (`pip install rewardserve-client`, or the server's own install).
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any, Awaitable, Callable, Iterable, Sequence

import httpx

from rewardserve.client.errors import ConnectionFailed, RewardServeError, Timeout, from_response

Item = dict[str, Any]
_RETRIED = (429, 502, 503)


def as_item(x: Any) -> Item:
    """An item dict from a dict (as the API takes it), a text, or a (prompt, response) pair."""
    if isinstance(x, dict):
        return x
    if isinstance(x, str):
        return {"text": x}
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(p, str) for p in x):
        return {"prompt": x[0], "response": x[1]}
    raise TypeError(f"an item is a dict, a text or a (prompt, response) pair, not {type(x).__name__}")


class AsyncRewardClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 180.0, batch_size: int = 256, concurrency: int = 4, retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if batch_size < 1 or concurrency < 1 or retries < 0:
            raise ValueError("batch_size and concurrency must be at least 1, retries at least 0")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep  # tests pass a recorder; waits are part of the behaviour
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, transport=transport,
                                       limits=httpx.Limits(max_connections=max(concurrency, 10)))

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- one request, with retries --------------------------------------------------------------
    async def post(self, path: str, body: dict, *, timeout: float | None = None) -> Any:
        """POST `body` to `path` and return the decoded JSON answer, retrying what is worth retrying."""
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                r = await self._http.post(path, json=body, timeout=timeout)
            except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
                raise Timeout(f"no answer from {self.url}{path} within {timeout} s ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:  # refused, reset, dropped, or no connection within the timeout
                error: RewardServeError = ConnectionFailed(f"{self.url}{path}: {type(exc).__name__}: {exc}")
            else:
                if r.status_code < 400:
                    return r.json()
                error = from_response(r.status_code, _json(r), r.text)
                if r.status_code not in _RETRIED:
                    raise error
                retry_after = _retry_after(r)
            if attempt == self.retries:
                raise error
            await self._sleep(self._delay(attempt, retry_after))
        raise AssertionError("unreachable. This is a bug.")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows when its queue drains: never earlier, a little later
            return retry_after * (1 + 0.2 * random.random())
        return min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + 0.5 * random.random())

    async def get(self, path: str) -> Any:
        r = await self._http.get(path)
        if r.status_code >= 400:
            raise from_response(r.status_code, _json(r), r.text)
        return r.json()

    # -- the API ----------------------------------------------------------------------------------
    async def score(self, items: Iterable[Any], *, model: str | None = None, timeout: float | None = None,
                    **options: Any) -> list[Item]:
        """/v1/score's item results, in input order, for any number of items (`options`: truncation,
        priority, cache, heads)."""
        items = [as_item(x) for x in items]
        body = self._options(model, options)
        gate = asyncio.Semaphore(self.concurrency)

        async def chunk(part: list[Item]) -> list[Item]:
            async with gate:
                return (await self.post("/v1/score", {**body, "items": part}, timeout=timeout))["items"]

        parts = [items[i: i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        tasks = [asyncio.ensure_future(chunk(p)) for p in parts]
        try:
            done = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        return [r for part in done for r in part]

    async def rewards(self, items: Iterable[Any], **kw: Any) -> list[float]:
        return [r["reward"] for r in await self.score(items, **kw)]

    async def best_of_n(self, candidates: Sequence[str], *, prompt: str | None = None,
                        messages: list[dict] | None = None, top_k: int | None = None, model: str | None = None,
                        timeout: float | None = None, **options: Any) -> dict:
        body = self._options(model, options) | {"candidates": list(candidates)}
        body |= {k: v for k, v in (("prompt", prompt), ("messages", messages), ("top_k", top_k)) if v is not None}
        return await self.post("/v1/best_of_n", body, timeout=timeout)

    async def compare(self, prompt: str | None = None, a: str | None = None, b: str | None = None, *,
                      pairs: list[dict] | None = None, length_tie: dict | None = None, model: str | None = None,
                      timeout: float | None = None, **options: Any) -> list[dict]:
        """Bradley-Terry comparisons: one (prompt, a, b), or `pairs` of {prompt, a, b}."""
        body = self._options(model, options)
        body |= {"pairs": pairs} if pairs is not None else {"prompt": prompt, "a": a, "b": b}
        if length_tie is not None:
            body["length_tie"] = length_tie
        return (await self.post("/v1/compare", body, timeout=timeout))["results"]

    async def score_steps(self, steps: Sequence[str] | None = None, *, prompt: str | None = None,
                          messages: list[dict] | None = None, solutions: list[dict] | None = None,
                          aggregate: str | None = None, separator: str | None = None, model: str | None = None,
                          timeout: float | None = None, **options: Any) -> list[dict]:
        """Step rewards: one solution (prompt or messages, and steps) or `solutions` of {prompt|messages,
        steps}; one {reward, step_rewards, ...} per solution."""
        body = self._options(model, options | {"aggregate": aggregate, "separator": separator})
        if solutions is not None:
            body["solutions"] = solutions
        else:
            body |= {k: v for k, v in (("prompt", prompt), ("messages", messages)) if v is not None}
            body["steps"] = list(steps or [])
        return (await self.post("/v1/score_steps", body, timeout=timeout))["results"]

    async def models(self) -> list[dict]:
        """Every entry the server serves (its /v1/models cards)."""
        return (await self.get("/v1/models"))["data"]

    def _options(self, model: str | None, options: dict) -> dict:
        body = {k: v for k, v in options.items() if v is not None}
        model = model or self.model
        return body | ({"model": model} if model else {})


class RewardClient:
    """The synchronous client: `AsyncRewardClient`'s calls, run on an event loop of its own in a
    background thread (so it works from plain code, from threads and from inside a running loop)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", **kw: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rewardserve-client", daemon=True)
        self._thread.start()
        self.aio = self._run(_make(url, kw))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.aio.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def post(self, path: str, body: dict, **kw: Any) -> Any:
        return self._run(self.aio.post(path, body, **kw))

    def score(self, items: Iterable[Any], **kw: Any) -> list[Item]:
        return self._run(self.aio.score(list(items), **kw))

    def rewards(self, items: Iterable[Any], **kw: Any) -> list[float]:
        return self._run(self.aio.rewards(list(items), **kw))

    def best_of_n(self, candidates: Sequence[str], **kw: Any) -> dict:
        return self._run(self.aio.best_of_n(candidates, **kw))

    def compare(self, prompt: str | None = None, a: str | None = None, b: str | None = None, **kw: Any) -> list[dict]:
        return self._run(self.aio.compare(prompt, a, b, **kw))

    def score_steps(self, steps: Sequence[str] | None = None, **kw: Any) -> list[dict]:
        return self._run(self.aio.score_steps(steps, **kw))

    def models(self) -> list[dict]:
        return self._run(self.aio.models())


async def _make(url: str, kw: dict) -> AsyncRewardClient:
    return AsyncRewardClient(url, **kw)  # made on the client's own loop, where it will run


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return max(0.0, float(r.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: fall back to the backoff
