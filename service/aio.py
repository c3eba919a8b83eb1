"""Small asyncio helpers shared by the long-running tasks (batcher, monitor)."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel a background task and wait until it has really stopped."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def next_set(event: asyncio.Event, timeout: float) -> bool:
    """Clear `event` and wait up to `timeout` seconds for it to be set again; True if it was."""
    event.clear()
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def gather_or_cancel(*aws):
    """asyncio.gather, except that the first failure cancels the others (and waits until they have
    stopped) before it is raised; cancelling the gather cancels them all."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()
    return [t.result() for t in tasks]
