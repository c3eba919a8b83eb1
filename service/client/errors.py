"""What the client raises: one exception type per way a call can fail, each carrying the server's
error body when there was one."""

from __future__ import annotations

from typing import Any


class RewardServeError(Exception):
    """A call failed. `status` is the HTTP status (None when no response came back), and `type`,
    `message`, `index` and `field` are the server's error body's fields when it sent one."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}
        self.type: str | None = err.get("type")
        self.index: int | None = err.get("index")
        self.field: str | None = err.get("field")


class BadRequest(RewardServeError):
    """4xx: the request itself is wrong (`field` and `index` name the part at fault); retrying it
    cannot help."""


class NotFound(BadRequest):
    """404: no such model (the message lists the served names) or endpoint."""


class Unauthorized(BadRequest):
    """401 / 403: a missing or wrong API key."""


class Overloaded(RewardServeError):
    """429 after every retry: the server's queue stayed full."""


class Unavailable(RewardServeError):
    """5xx after every retry: not ready yet, or the batch failed on its device."""


class ConnectionFailed(RewardServeError):
    """No response after every retry: the server could not be reached or dropped the connection."""


class Timeout(RewardServeError):
    """No response within the call's timeout. Not retried: the server may still be computing it."""


def from_response(status: int, body: Any, text: str) -> RewardServeError:
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else text[:500]
    kind = {401: Unauthorized, 403: Unauthorized, 404: NotFound, 429: Overloaded}.get(status)
    if kind is None:
        kind = Unavailable if status >= 500 else BadRequest
    return kind(f"HTTP {status}: {message}", status=status, body=body)
