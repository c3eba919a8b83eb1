"""Typed errors shared by every layer.

Each carries the HTTP status it maps to, a machine-readable `type`, and the index of the offending
item when there is one. The API layer turns them into `{"error": {"type", "message", "index"?}}`;
lower layers raise them without knowing about HTTP.
"""

from __future__ import annotations


class ServiceError(Exception):
    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.index = index
        self.field = field

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


class NotReady(ServiceError):
    status = 503
    type = "not_ready"


def bug(message: str) -> AssertionError:
    """A broken internal invariant: the message says so, as DESIGN.md asks."""
    return AssertionError(f"{message} This is a bug.")
