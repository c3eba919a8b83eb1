"""What flows through the engine: items waiting for a batch, and the request they belong to."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import IntEnum

from rewardserve.models.units import Unit


class Lane(IntEnum):
    """Priority lanes: a batch takes every waiting interactive item before any bulk item."""

    interactive = 0
    bulk = 1


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's share of the queue; `cancel()` drops its items that have not started yet."""

    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(slots=True)
class Timing:
    """Where one request's time went (seconds), for the timing headers: its slowest unit's wait and
    batch, and its tokenisation."""

    tokenize: float = 0.0
    queue: float = 0.0
    inference: float = 0.0


@dataclass(eq=False, slots=True)
class WorkItem:
    work: Unit  # its future holds the unit's output rows, in order
    lane: Lane
    tickets: list[Ticket]  # every request waiting for this item (single-flight adds to it)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its batch started on a device
    finished: float = 0.0  # when its batch came back

    @property
    def tokens(self) -> int:
        return self.work.tokens

    @property
    def dead(self) -> bool:
        return self.future.done() or all(t.cancelled for t in self.tickets)
