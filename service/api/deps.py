"""Route dependencies: the engine, checked ready and matched against the requested model name."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request

from rewardserve.engine.engine import Engine
from rewardserve.errors import ModelNotFound, NotReady


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def ready_engine(engine: Annotated[Engine, Depends(get_engine)]) -> Engine:
    if not engine.ready:
        raise NotReady("model is still loading; poll /readyz")
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]
ReadyEngine = Annotated[Engine, Depends(ready_engine)]


def check_model(engine: Engine, requested: str | None) -> None:
    if requested is not None and requested != engine.name:
        raise ModelNotFound(f"model {requested!r} is not served here; this server serves {engine.name!r}")


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
