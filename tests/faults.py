"""Faults injected in front of a real server: answers it would give under overload or failure, and
answers that come late."""

from __future__ import annotations

import asyncio
from collections import deque

import orjson


class Faults:
    """ASGI middleware: each HTTP request under `prefix` takes the next queued fault, if any:
    ("status", code, retry_after) answers with that status (and Retry-After when given) as
    rewardserve's own error would; ("delay", seconds) holds the request back before the app sees it."""

    def __init__(self, app, prefix: str = "/v1/"):
        self.app = app
        self.prefix = prefix
        self.queue: deque[tuple] = deque()
        self.seen = 0  # requests that reached the middleware under the prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        self.seen += 1
        fault = self.queue.popleft() if self.queue else None
        if fault and fault[0] == "status":
            _, code, retry_after = fault
            kind = {429: "overloaded", 503: "backend_error"}.get(code, "injected")
            body = orjson.dumps({"error": {"type": kind, "message": f"injected {code}"}})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if retry_after is not None:
                headers.append((b"retry-after", str(retry_after).encode()))
            await send({"type": "http.response.start", "status": code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if fault and fault[0] == "delay":
            await asyncio.sleep(fault[1])
        await self.app(scope, receive, send)
