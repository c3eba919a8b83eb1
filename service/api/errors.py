"""Every error leaves the service as `{"error": {"type", "message", "index"?, "field"?}}`, or in the
shape a peer-compatible route speaks (`api/compat/route_class`), which renders the same description."""

from __future__ import annotations

import logging

import orjson

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rewardserve.api.deps import ClientGone
from rewardserve.errors import Overloaded, ServiceError

log = logging.getLogger(__name__)


_LISTS = ("items", "candidates", "pairs")  # the request lists whose entries `index` names


def field_path(loc: tuple) -> tuple[str, int | None]:
    """('body', 'items', 3, 'text') -> ('items[3].text', 3)."""
    parts = [p for p in loc if p != "body"]
    index = parts[1] if len(parts) > 1 and parts[0] in _LISTS and isinstance(parts[1], int) else None
    path = ""
    for p in parts:
        if isinstance(p, int):
            path += f"[{p}]"
        elif p in ("function-after[_one_form()]",) or str(p).startswith(("function-", "json-or-python")):
            continue  # pydantic's validator frames, not fields a user wrote
        else:
            path += ("." if path else "") + str(p)
    return path, index


def validation_body(exc: RequestValidationError) -> tuple[int, dict]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = errors[0].get("ctx", {}).get("error", "malformed JSON")
        return 400, {"error": {"type": "invalid_json", "message": f"request body is not valid JSON: {detail}"}}
    messages = []
    index = None
    field = None
    for e in errors[:5]:
        path, idx = field_path(tuple(e.get("loc", ())))
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        messages.append(f"{path}: {msg}" if path else msg)
        if index is None and idx is not None:
            index, field = idx, path
        field = field or path
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    body = {"type": "invalid_request", "message": "; ".join(messages) + more}
    if index is not None:
        body["index"] = index
    if field:
        body["field"] = field
    return 422, {"error": body}


def describe(request: Request, exc: Exception) -> tuple[int, dict, dict | None] | None:
    """(status, the error's fields, headers) for a typed error or a validation error, counted in the
    error metrics; None for anything else."""
    if isinstance(exc, ServiceError):
        status, body = exc.status, exc.body()
    elif isinstance(exc, RequestValidationError):
        status, body = validation_body(exc)
    else:
        return None
    _count(request, body["error"]["type"])
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
    return status, body["error"], headers


async def send_error(send, exc: ServiceError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer a raw ASGI request with a typed error, for middleware that refuses before any route."""
    body = orjson.dumps(exc.body())
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if isinstance(exc, Overloaded):
        head.append((b"retry-after", str(exc.retry_after).encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    @app.exception_handler(RequestValidationError)
    async def _typed(request: Request, exc: Exception) -> JSONResponse:
        status, err, headers = describe(request, exc)
        return JSONResponse({"error": err}, status_code=status, headers=headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        # nobody reads this: 499 (nginx's "client closed request") keeps the access log honest
        return JSONResponse({"error": {"type": "client_closed", "message": "client went away"}}, status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": {"type": kind, "message": str(exc.detail)}}, status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        _count(request, "internal_error")
        return JSONResponse(
            {"error": {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}. This is a bug."}},
            status_code=500,
        )


def model_label(scope) -> str:
    """The entry a request was for (set by the route once it picked a scorer), else the default entry."""
    return scope.get("state", {}).get("model") or scope["app"].state.registry.default


def _count(request: Request, kind: str) -> None:
    request.app.state.metrics.errors.labels(model_label(request.scope), kind).inc()
