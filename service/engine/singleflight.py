"""Single-flight: an item identical to one already queued or running (same cache key) waits for
that computation, from the same request or another, instead of running again."""

from __future__ import annotations

from rewardserve.engine.types import Ticket, WorkItem


class Inflight:
    def __init__(self):
        self._by_key: dict[bytes, tuple[WorkItem, int]] = {}  # key -> (the unit computing it, its first row)

    def join(self, key: bytes, ticket: Ticket) -> tuple[WorkItem, int] | None:
        """The running computation of `key`, now also kept alive by `ticket`; None if there is none."""
        running = self._by_key.get(key)
        if running is None or running[0].future.done():
            return None
        running[0].tickets.append(ticket)
        return running

    def add(self, key: bytes, item: WorkItem, first_row: int) -> None:
        self._by_key[key] = (item, first_row)

    def done(self, key: bytes, item: WorkItem) -> None:
        running = self._by_key.get(key)
        if running is not None and running[0] is item:
            del self._by_key[key]
