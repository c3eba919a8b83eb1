"""Admission before anything is read: the cheapest refusals, for when the server is overloaded.

A request is refused with 429 (and Retry-After) before its body is read or parsed when
- `max_concurrent_requests` scoring requests are already in flight (each holds memory until it is
  answered), or
- its X-Request-Timeout is shorter than the wait the default entry's queue already has: it could
  not be served in time, and parsing it would only take CPU from the requests that can.
(A request whose deadline is in its body is refused the same way once parsed: the batcher checks.)
"""

from __future__ import annotations

from rewardserve.api.errors import send_error
from rewardserve.errors import Overloaded


class Admission:
    def __init__(self, app, registry, max_concurrent: int, metrics):
        self.app, self.registry, self.max_concurrent, self.metrics = app, registry, max_concurrent, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            self.metrics.rejected.labels(self.registry.default).inc()
            return await send_error(send, refusal)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _refusal(self, scope) -> Overloaded | None:
        batcher = self.registry.default_batcher()
        retry = batcher.retry_after() if batcher is not None else 1
        if self.in_flight >= self.max_concurrent:
            return Overloaded(f"{self.in_flight} requests in flight, the server's max_concurrent_requests; retry "
                              "later", retry_after=retry)
        asked = next((v for k, v in scope["headers"] if k == b"x-request-timeout"), None)
        if asked is None or batcher is None:
            return None
        try:
            seconds = float(asked)
        except ValueError:
            return None  # the route answers a bad header with its own 422
        wait = batcher.expected_wait()
        if wait > seconds:
            return Overloaded(f"the queue needs about {wait:.2f} s, longer than this request's {seconds:g} s "
                              "deadline; retry later", retry_after=retry)
        return None
