"""What the routes share: the registry, the scorer a request names, and scoring with the request's
options, its client's presence and its own field names for errors."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Awaitable, Callable, Sequence

from fastapi import Depends, Request

from rewardserve.engine.registry import Registry
from rewardserve.engine.types import Lane, Meter
from rewardserve.errors import DeadlineExceeded, Draining, InvalidInput, RequestTooLarge, ServiceError
from rewardserve.models.tokenize import ItemLike
from rewardserve.scorers.base import Call, Result, Scorer
from rewardserve.transforms.shaping import score_shaped


async def get_registry(request: Request) -> Registry:  # async: a sync dependency costs a thread hop
    return request.app.state.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]

# (index in the scorer's item list, the item's part at fault) -> (index, field) in the route's own terms
Locate = Callable[[int, str | None], tuple[int | None, str]]


def item_field(name: str) -> Locate:
    """Items of a request list `name`: items[3], items[3].input_ids, ..."""
    return lambda i, part: (i, f"{name}[{i}]" + (f".{part}" if part else ""))


def pick(request: Request, registry: Registry, name: str | None) -> Scorer:
    """The scorer a request names; its name labels the request's metrics. A request that arrived after
    the server began to drain is refused (those that arrived before are finished)."""
    if request.scope.get("state", {}).get("arrived_draining"):
        raise Draining("the server is shutting down; send this request to another replica")
    scorer = registry.get(name)
    request.state.model = scorer.name
    return scorer


def call_of(opts, groups: Sequence[Sequence[int]] = ()) -> Call:
    """The scorer's view of a native request's options (its transform and advantages are applied above
    the scorer: score_items)."""
    return Call(lane=Lane[opts.priority], use_cache=opts.cache, truncation=opts.truncation, heads=opts.heads,
                groups=groups)


def timeout_of(request: Request, settings, asked: float | None) -> tuple[float | None, str]:
    """(seconds, where they came from): the body's `timeout`, else the X-Request-Timeout header, else
    the server's request_timeout_s; capped at max_request_timeout_s."""
    source = "the request's timeout field"
    if asked is None and "x-request-timeout" in request.headers:
        source = "the X-Request-Timeout header"
        try:
            asked = float(request.headers["x-request-timeout"])
        except ValueError:
            asked = -1.0
        if not 0 < asked < float("inf"):
            raise InvalidInput(f"X-Request-Timeout must be a positive number of seconds, not "
                               f"{request.headers['x-request-timeout']!r}", field="X-Request-Timeout")
    if asked is None:
        asked, source = settings.request_timeout_s, "the server's request_timeout_s"
    if asked is not None and asked > settings.max_request_timeout_s:
        asked, source = settings.max_request_timeout_s, "max_request_timeout_s"
    return asked, source


async def score_items(request: Request, registry: Registry, model: str | None, items: Sequence[ItemLike],
                      locate: Locate, call: Call, timeout: float | None = None, transform=None,
                      advantages: str | None = None) -> tuple[Scorer, list[Result]]:
    """Score items with the scorer `model` names (the default entry for None), within the request's
    deadline (`timeout`: the body's own), its token limit and its caller's quota, shaped by
    `transform` (else the entry's) and with `advantages` when asked; an error about one item names it
    by `locate`."""
    return await run_scoring(request, registry, model, len(items), locate, call, timeout,
                             lambda scorer: score_shaped(scorer, items, call, transform, advantages))


async def run_scoring(request: Request, registry: Registry, model: str | None, n_items: int, locate: Locate,
                      call: Call, timeout: float | None, work: Callable[[Scorer], Awaitable[list[Result]]]
                      ) -> tuple[Scorer, list[Result]]:
    """`work(scorer)` for `n_items` items under the request's limits, deadline, quota and disconnection."""
    scorer = pick(request, registry, model)
    settings = registry.settings
    limit = settings.max_items_per_request
    if n_items > limit:
        raise RequestTooLarge(f"request expands to {n_items} items, more than max_items_per_request ({limit})")
    seconds, source = timeout_of(request, settings, timeout)
    if seconds is not None:
        call.ticket.deadline = time.monotonic() + seconds
    tenant = request.scope.get("state", {}).get("tenant")
    call.meter = Meter(settings.max_request_tokens, tenant.charge_tokens if tenant is not None else None)
    try:
        results = await unless_disconnected(request, work(scorer), seconds)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(f"the request's deadline of {seconds:g} s (from {source}) passed; what it still had "
                               "queued was dropped") from None
    except ServiceError as exc:
        if exc.index is None or exc.field is not None:
            raise
        index, field = locate(exc.index, exc.part)
        raise exc.located(index, field) from None
    return scorer, results


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work, timeout: float | None = None):
    """Await `work`, cancelling it (and so dropping its queued items) if the client disconnects first
    (ClientGone) or `timeout` seconds pass (asyncio.TimeoutError)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if watch.done() and not watch.cancelled():
            raise ClientGone()
        raise asyncio.TimeoutError()
    return task.result()


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""
