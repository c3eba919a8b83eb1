"""Typed errors shared by every layer.

Each carries the HTTP status it maps to, a machine-readable `type`, and, when one item is at fault,
its position: `index` in the list the scorer was given and `part`, the item's part at fault
(`input_ids`, `messages`, ...). Lower layers raise them without knowing about HTTP or about the
request's field names; each route maps positions to its own fields (`located`), and the API layer
turns them into `{"error": {"type", "message", "index"?, "field"?}}`.
"""

from __future__ import annotations

import copy


class ServiceError(Exception):
    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, index: int | None = None, part: str | None = None,
                 field: str | None = None):
        super().__init__(message)
        self.message = message
        self.index = index
        self.part = part
        self.field = field

    def located(self, index: int | None, field: str | None) -> "ServiceError":
        """The same error at the position a route names."""
        err = copy.copy(self)
        err.index, err.field, err.part = index, field, None
        return err

    def moved(self, index: int, part: str | None) -> "ServiceError":
        """The same error about another item (a scorer that expanded its items maps them back)."""
        err = copy.copy(self)
        err.index, err.part = index, part
        return err

    def reworded(self, message: str) -> "ServiceError":
        err = copy.copy(self)
        err.message, err.args = message, (message,)
        return err

    def body(self) -> dict:
        err: dict = {"type": self.type, "message": self.message}
        if self.index is not None:
            err["index"] = self.index
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}


class InvalidInput(ServiceError):
    status = 422
    type = "invalid_input"


class ItemTooLong(ServiceError):
    status = 413
    type = "item_too_long"


class RequestTooLarge(ServiceError):
    status = 413
    type = "request_too_large"


class ModelNotFound(ServiceError):
    status = 404
    type = "model_not_found"


class Overloaded(ServiceError):
    status = 429
    type = "overloaded"

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class BackendError(ServiceError):
    """The batch an item rode in failed on its device (or produced a non-finite score)."""

    status = 503
    type = "backend_error"


class QuotaExceeded(Overloaded):
    """This caller's own rate (its API key's quota), not the server's queue."""

    type = "quota_exceeded"


class NotReady(ServiceError):
    status = 503
    type = "not_ready"


class Draining(NotReady):
    """The server is shutting down: it finishes what it has, and takes nothing new."""

    type = "draining"


class DeadlineExceeded(ServiceError):
    status = 504
    type = "deadline_exceeded"


class Unauthorized(ServiceError):
    status = 401
    type = "unauthorized"


class Forbidden(ServiceError):
    status = 403
    type = "forbidden"


def bug(message: str) -> AssertionError:
    """A broken internal invariant: the message says so, as DESIGN.md asks."""
    return AssertionError(f"{message} This is a bug.")
