"""What the routes share: the registry, the scorer a request names, and scoring with the request's
options, its client's presence and its own field names for errors."""

from __future__ import annotations

import asyncio
from typing import Annotated, Callable, Sequence

from fastapi import Depends, Request

from rewardserve.engine.registry import Registry
from rewardserve.engine.types import Lane
from rewardserve.errors import RequestTooLarge, ServiceError
from rewardserve.models.tokenize import ItemLike
from rewardserve.scorers.base import Call, Result, Scorer


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]

# (index in the scorer's item list, the item's part at fault) -> (index, field) in the route's own terms
Locate = Callable[[int, str | None], tuple[int | None, str]]


def item_field(name: str) -> Locate:
    """Items of a request list `name`: items[3], items[3].input_ids, ..."""
    return lambda i, part: (i, f"{name}[{i}]" + (f".{part}" if part else ""))


def pick(request: Request, registry: Registry, name: str | None) -> Scorer:
    """The scorer a request names; its name labels the request's metrics."""
    scorer = registry.get(name)
    request.state.model = scorer.name
    return scorer


def call_of(opts, groups: Sequence[Sequence[int]] = ()) -> Call:
    """The scorer's view of a native request's options."""
    return Call(lane=Lane[opts.priority], use_cache=opts.cache, truncation=opts.truncation, heads=opts.heads,
                groups=groups)


async def score_items(request: Request, registry: Registry, model: str | None, items: Sequence[ItemLike],
                      locate: Locate, call: Call) -> tuple[Scorer, list[Result]]:
    """Score items with the scorer `model` names (the default entry for None); an error about one
    item names it by `locate`."""
    scorer = pick(request, registry, model)
    limit = registry.settings.max_items_per_request
    if len(items) > limit:
        raise RequestTooLarge(f"request expands to {len(items)} items, more than max_items_per_request ({limit})")
    try:
        return scorer, await unless_disconnected(request, scorer.score(items, call))
    except ServiceError as exc:
        if exc.index is None or exc.field is not None:
            raise
        index, field = locate(exc.index, exc.part)
        raise exc.located(index, field) from None


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work):
    """Await `work`, cancelling it (and so dropping its queued items) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise ClientGone()
    return task.result()


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""
