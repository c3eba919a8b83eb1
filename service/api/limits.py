"""Limits before work: what one request may cost, checked before anything is built from it.

Every route reads its body through `LimitedRequest` (the routers' `Route` class):
- the body: refused with 413 as soon as its Content-Length, or the bytes actually received (a
  chunked body has no length), pass `max_body_bytes`: nothing larger is ever held in memory;
- the JSON: parsed by orjson (C, strict: no NaN or Infinity, no lone surrogates, no raw control
  characters, no invalid UTF-8, nesting under 1024); then no deeper than `max_json_depth` and no
  string longer than `max_text_chars`, checked in one pass over the parsed values.
A body orjson refuses is parsed again, leniently, only to find the value at fault, so the error
names its field and item (`items[3].text`) rather than a byte offset.
"""

from __future__ import annotations

import json
import math

import orjson
from fastapi import HTTPException
from fastapi.routing import APIRoute
from starlette.requests import Request

from rewardserve.api.errors import field_path
from rewardserve.errors import InvalidInput, RequestTooLarge, ServiceError


class BodyTooLarge(RequestTooLarge):
    type = "body_too_large"


class TooDeep(ServiceError):
    status = 400
    type = "json_too_deep"


class TextTooLong(RequestTooLarge):
    type = "text_too_long"


class InvalidValue(InvalidInput):
    type = "invalid_value"


class Rejected(HTTPException):
    """Carries a typed error out of FastAPI's body parsing (which turns any other exception there into
    an untyped 400); the route unwraps it."""

    def __init__(self, error: ServiceError):
        super().__init__(error.status, error.message)
        self.error = error


def _where(path: tuple) -> tuple[int | None, str]:
    field, index = field_path(("body", *path))
    return index, field


def check(value, max_depth: int, max_chars: int) -> None:
    """One pass over parsed JSON: nesting depth and string lengths."""
    stack = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if len(node) > max_chars:
                index, field = _where(path)
                raise TextTooLong(f"{field or 'a string'} has {len(node)} characters, more than max_text_chars "
                                  f"({max_chars})", index=index, field=field or None)
            continue
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            if isinstance(child, (dict, list)) and depth + 1 > max_depth:
                index, field = _where((*path, key))
                raise TooDeep(f"the body nests deeper than max_json_depth ({max_depth}) at {field}", index=index,
                              field=field)
            if isinstance(child, (str, dict, list)):
                stack.append((child, depth + 1, (*path, key)))


def _nodes(value):
    """Every value inside parsed JSON, with its path."""
    stack = [(value, ())]
    while stack:
        node, path = stack.pop()
        yield node, path
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend((child, (*path, key)) for key, child in children)


def _bad_value(node) -> str | None:
    if isinstance(node, float) and not math.isfinite(node):
        return f"{node} is not a number JSON allows (NaN, Infinity, or too large)"
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            return "the text is not valid UTF-8 (invalid bytes or a lone surrogate)"
    return None


def _raw_control(node) -> str | None:
    if isinstance(node, str) and any(ord(c) < 32 for c in node):
        return "the text holds a raw control character (escape it as \\uXXXX)"
    return None


def locate_invalid(body: bytes) -> ServiceError | None:
    """Why orjson refused `body`, at the value at fault, when a lenient parse can find it."""
    try:
        value = json.loads(body.decode("utf-8", "surrogateescape"), strict=False)
    except (ValueError, RecursionError):
        return None  # not JSON even leniently: the parser's byte offset is all there is
    # escaped control characters are valid JSON, so they are suspects only when nothing else is wrong
    for test in (_bad_value, _raw_control):
        for node, path in _nodes(value):
            problem = test(node)
            if problem:
                index, field = _where(path)
                return InvalidValue(f"{field or 'the body'}: {problem}", index=index, field=field or None)
    return None


class LimitedRequest(Request):
    """A request whose body is read under the server's limits and parsed by orjson."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            limit = self.app.state.settings.max_body_bytes
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise Rejected(BodyTooLarge(f"the body's Content-Length is {declared} bytes, more than "
                                            f"max_body_bytes ({limit})"))
            chunks, size = [], 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > limit:
                    raise Rejected(BodyTooLarge(f"the body passed max_body_bytes ({limit}) before it ended"))
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                value = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                if "depth limit" in str(exc):  # orjson's own ceiling, 1024 levels
                    raise Rejected(TooDeep(f"the body nests deeper than max_json_depth "
                                           f"({self.app.state.settings.max_json_depth})")) from None
                located = locate_invalid(body)
                if located is not None:
                    raise Rejected(located) from None
                raise  # FastAPI answers it as invalid JSON, with the parser's message
            s = self.app.state.settings
            try:
                check(value, s.max_json_depth, s.max_text_chars)
            except ServiceError as err:
                raise Rejected(err) from None
            self._json = value
        return self._json


class Route(APIRoute):
    """Every router's route class: bodies read under the limits; typed errors raised while reading
    them leave as themselves."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(LimitedRequest(request.scope, request.receive))
            except Rejected as exc:
                raise exc.error from None

        return handle
