"""What flows through the engine: items waiting for a batch, and the request they belong to."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

from rewardserve.errors import RequestTooLarge
from rewardserve.models.units import Unit


class Lane(IntEnum):
    """Priority lanes: a batch takes every waiting interactive item before any bulk item."""

    interactive = 0
    bulk = 1


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's share of the queue; `cancel()` drops its items that have not started yet, and so
    does its deadline (time.monotonic()) passing."""

    cancelled: bool = False
    deadline: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def gone(self) -> bool:
        return self.cancelled or (self.deadline is not None and time.monotonic() >= self.deadline)


@dataclass(eq=False, slots=True)
class Meter:
    """What one request may still cost: `max_tokens` over all its items and models, and its caller's
    token quota (`charge(tokens)` raises when the caller is over it)."""

    max_tokens: int
    charge: Callable[[int], None] | None = None
    used: int = 0

    def add(self, tokens: int) -> None:
        self.used += tokens
        if self.used > self.max_tokens:
            raise RequestTooLarge(f"the request holds {self.used} tokens, more than max_request_tokens "
                                  f"({self.max_tokens})")
        if self.charge is not None:
            self.charge(tokens)


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
        return self.future.done() or all(t.gone for t in self.tickets)
