"""The dynamic batcher: one asyncio task that owns the queue.

A batch closes at its token budget, `max_batch_items` items, or `max_wait_ms` after its oldest item
arrived, whichever comes first. The token budget is `max_batch_tokens`, or fewer: what the device
computes in `max_step_ms` at its measured rate. Big batches buy nothing once the device is busy
(on CPU tokens/s is flat from 512 to 16k-token batches), but every item of a batch waits for all of
it, and an interactive item that arrives behind it waits for it too; so a step is kept short. It
waits for a free worker *before* collecting, so while every device is busy the queue keeps filling
and the next batch is larger; a worker with a second place (an engine process's) is collected for
only shortly before its running batch is due (engine/workers.py). Interactive items go
before bulk ones; items of one request may ride in several batches; items whose client went away
are dropped when they reach the head of the queue, before they cost compute.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

from rewardserve.aio import cancel_and_wait, next_set
from rewardserve.engine.types import Lane, Ticket, WorkItem
from rewardserve.engine.workers import ModelWorkers
from rewardserve.errors import DeadlineExceeded, Overloaded, RequestTooLarge
from rewardserve.models.units import Unit
from rewardserve.monitoring.metrics import Metrics


@dataclass(frozen=True)
class Budgets:
    max_tokens: int  # a batch closes at this many real tokens
    max_items: int  # ... or this many units
    max_wait: float  # ... or this many seconds after its oldest unit arrived
    max_queued: int  # tokens the queue may hold before requests get 429
    max_step: float = 0.0  # ... or the tokens the device computes in this many seconds (0: no such limit)


class Batcher:
    """One model's queue; its batches go to whichever of the model's devices is free."""

    def __init__(self, budgets: Budgets, pool: ModelWorkers, metrics: Metrics, model_name: str):
        self.max_tokens = budgets.max_tokens
        self.max_items = budgets.max_items
        self.max_wait = budgets.max_wait
        self.max_queued = budgets.max_queued
        self.max_step = budgets.max_step
        self.pool = pool
        self.metrics = metrics
        self.model = model_name
        self.lanes: tuple[deque[WorkItem], deque[WorkItem]] = (deque(), deque())
        self.queued_tokens = 0
        self.waited = 0.0  # EWMA of how long each batch's oldest item waited
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- producer side (request handlers) -------------------------------------------------------
    def submit(self, units: list[Unit], lane: Lane, ticket: Ticket) -> list[WorkItem]:
        """Queue one request's items, or reject the whole request (nothing is half-admitted)."""
        tokens = sum(u.tokens for u in units)
        if tokens > self.max_queued:
            raise RequestTooLarge(
                f"request holds {tokens} tokens, more than the server's queue capacity ({self.max_queued}); split it"
            )
        if self.queued_tokens + tokens > self.max_queued:
            self.metrics.rejected.labels(self.model).inc()
            raise Overloaded(
                f"queue is full ({self.queued_tokens} tokens waiting, limit {self.max_queued}); retry later",
                retry_after=self.retry_after(),
            )
        wait = self.expected_wait(tokens)
        if ticket.deadline is not None and time.monotonic() + wait > ticket.deadline:
            # it could not be served in time: say so now rather than at its deadline, and spend nothing on it
            self.metrics.rejected.labels(self.model).inc()
            raise Overloaded(f"the queue needs about {wait:.2f} s, longer than this request's deadline allows; retry "
                             "later", retry_after=self.retry_after())
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [WorkItem(u, lane, [ticket], loop.create_future(), now) for u in units]
        self.lanes[lane].extend(items)
        self.queued_tokens += tokens
        self._publish_depth()
        self._arrived.set()
        return items

    def expected_wait(self, tokens: int = 0) -> float:
        """Seconds a request joining now would likely wait: the queue (and `tokens` more) at the measured
        rate, or what the last batches' oldest items actually waited, whichever is longer (the rate
        counts only the device's time, so it is optimistic when the host itself is the bottleneck)."""
        if self.queued_tokens == 0:
            return 0.0
        rate = self.pool.tokens_per_second
        return max(self.waited, (self.queued_tokens + tokens) / rate if rate > 0 else 0.0)

    def retry_after(self) -> int:
        """Seconds until the current queue has likely drained, from the measured token rate."""
        rate = self.pool.tokens_per_second
        if rate <= 0:
            return 1
        return max(1, min(60, math.ceil(self.queued_tokens / rate)))

    def step_tokens(self) -> int:
        """The next batch's token budget: max_tokens, or what the device computes in max_step at its
        measured rate when that is fewer (a batch always takes at least one item, however long).
        From small batches the rate reads low, but the budget still grows while a step takes less
        than max_step, so it settles where a step takes about max_step."""
        rate = self.pool.tokens_per_second
        if self.max_step <= 0 or rate <= 0:
            return self.max_tokens
        return max(1, min(self.max_tokens, int(rate * self.max_step)))

    # -- consumer side (the one task) ---------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="rewardserve-batcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            await self._wait_for_items()
            worker = await self.pool.acquire()
            await self.pool.next_batch_due(worker)
            batch = await self._collect()
            if batch:
                self.pool.dispatch(worker, batch)
            else:
                self.pool.release(worker)

    async def _wait_for_items(self) -> None:
        while not (self.lanes[0] or self.lanes[1]):
            self._arrived.clear()
            await self._arrived.wait()

    def _oldest(self) -> WorkItem | None:
        heads = [q[0] for q in self.lanes if q]
        return min(heads, key=lambda it: it.enqueued) if heads else None

    async def _collect(self) -> list[WorkItem]:
        batch: list[WorkItem] = []
        tokens = 0
        budget = self.step_tokens()
        self.metrics.batch_budget.labels(self.model).set(budget)
        oldest = self._oldest()
        deadline = (oldest.enqueued if oldest else time.perf_counter()) + self.max_wait
        while True:
            full = self._take(batch, tokens, budget)
            tokens = sum(it.tokens for it in batch)
            remaining = deadline - time.perf_counter()
            if full or remaining <= 0:
                break
            await next_set(self._arrived, remaining)
        # items are counted as queued until their batch leaves; a client may have left meanwhile
        self.queued_tokens -= tokens
        live = []
        for it in batch:
            if it.dead:
                self._drop(it)
            else:
                live.append(it)
        self._publish_depth()
        now = time.perf_counter()
        for it in live:
            self.metrics.queue_duration.labels(self.model, it.lane.name).observe(now - it.enqueued)
        if live:
            oldest = now - min(it.enqueued for it in live)
            self.waited = 0.7 * self.waited + 0.3 * oldest
        return live

    def _take(self, batch: list[WorkItem], tokens: int, budget: int) -> bool:
        """Move items from the lanes into `batch`; True when the batch is full."""
        for queue in self.lanes:
            while queue:
                it = queue[0]
                if it.dead:
                    queue.popleft()
                    self.queued_tokens -= it.tokens
                    self._drop(it)
                    continue
                if len(batch) >= self.max_items or (batch and tokens + it.tokens > budget):
                    return True
                queue.popleft()
                batch.append(it)
                tokens += it.tokens
        return len(batch) >= self.max_items or tokens >= budget

    def _drop(self, it: WorkItem) -> None:
        if not it.future.done():  # nobody waits for it any more; resolve it so nothing can hang
            self.metrics.dropped_items.labels(self.model).inc()
            if all(t.cancelled for t in it.tickets):
                it.future.cancel()
            else:  # their deadlines passed: whoever still looks learns so (a timer may not have fired yet)
                it.future.set_exception(DeadlineExceeded("the request's deadline passed before its items ran"))

    def _publish_depth(self) -> None:
        for lane in Lane:
            self.metrics.queue_depth.labels(self.model, lane.name).set(len(self.lanes[lane]))
        self.metrics.queued_tokens.labels(self.model).set(self.queued_tokens)
