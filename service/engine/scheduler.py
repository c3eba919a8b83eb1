"""The scheduler: what happens between a scorer and one model's device, in four readable steps.

1. cache look-up (`ModelCache`): hits answer at once;
2. single-flight (`Inflight`): a miss identical to an item already queued or running, or to an
   earlier item of the same request, joins it;
3. grouping (`share_prefix`): the remaining members of a group that shares a prompt become
   shared-prefix units; everything else is a lone unit;
4. dispatch (`Batcher`): the units are admitted to the model's queue together or not at all; each
   unit's rows are stored in the cache when it completes.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Sequence

from rewardserve.cache.tiered import ModelCache, Rows
from rewardserve.engine.batcher import Batcher
from rewardserve.engine.grouping import share_prefix
from rewardserve.engine.singleflight import Inflight
from rewardserve.engine.types import Lane, Ticket, Timing, WorkItem
from rewardserve.errors import bug
from rewardserve.models.units import Unit
from rewardserve.monitoring.metrics import Metrics


@dataclass(slots=True)
class Seq:
    """What a scorer asks of its model for one item: token ids, and the positions whose head
    outputs it reads (one output row each)."""

    ids: list[int]
    pools: tuple[int, ...]


class ModelRunner:
    def __init__(self, name: str, batcher: Batcher, cache: ModelCache | None, metrics: Metrics, max_tokens: int,
                 shares_prefix: bool):
        self.name = name
        self.batcher = batcher
        self.cache = cache
        self.metrics = metrics
        self.max_tokens = max_tokens
        self.shares_prefix = shares_prefix
        self.inflight = Inflight()

    async def run(self, seqs: Sequence[Seq], *, lane: Lane, ticket: Ticket, use_cache: bool = True,
                  groups: Sequence[Sequence[int]] = (), timing: Timing | None = None) -> list[tuple[Rows, bool]]:
        """(rows, cached) per sequence. Raises typed errors (429 overload, 503 backend).

        `groups` lists indices of sequences that share a prompt: their common token prefix is
        computed once where the backend can (packed: a tree-shaped batch; HF decoders: a KV cache)."""
        cache = self.cache if use_cache else None
        keys = [cache.key(s.ids) for s in seqs] if cache else []
        found = await cache.lookup(keys, [len(s.pools) for s in seqs]) if cache else [None] * len(seqs)
        waits: list[tuple[WorkItem, int] | None] = [None] * len(seqs)  # (unit computing it, its first row)
        copies: list[tuple[int, int]] = []  # (item, earlier identical item of this request)
        todo: list[int] = []
        first: dict[bytes, int] = {}
        for i in range(len(seqs)):
            if found[i] is not None:
                continue
            if cache:
                if keys[i] in first:
                    copies.append((i, first[keys[i]]))
                    continue
                first[keys[i]] = i
                waits[i] = self.inflight.join(keys[i], ticket)
                if waits[i] is not None:
                    self.metrics.singleflight_shared.labels(self.name).inc()
                    continue
            todo.append(i)
        units = self._units(seqs, todo, groups)
        if units:
            for (unit, members), item in zip(units, self.batcher.submit([u for u, _ in units], lane, ticket)):
                row = 0
                for i in members:
                    waits[i] = (item, row)
                    if cache:
                        self.inflight.add(keys[i], item, row)
                    row += len(seqs[i].pools)
                item.future.add_done_callback(functools.partial(
                    self._settle, [keys[i] for i in members] if cache else [], [len(seqs[i].pools) for i in members],
                    item))
        units_waited = list({id(w[0]): w[0] for w in waits if w is not None}.values())
        await self._wait(units_waited, ticket)
        if timing is not None and units_waited:
            timing.queue = max(timing.queue, max(u.started - u.enqueued for u in units_waited))
            timing.inference = max(timing.inference, max(u.finished - u.started for u in units_waited))
        out: list[tuple[Rows, bool] | None] = [None] * len(seqs)
        for i, s in enumerate(seqs):
            if found[i] is not None:
                out[i] = (found[i], True)
            elif waits[i] is not None:
                item, row = waits[i]
                out[i] = (item.future.result()[row: row + len(s.pools)], False)
        for i, j in copies:
            out[i] = out[j]
        if any(o is None for o in out):
            raise bug("an item got no rows.")
        return out

    def _units(self, seqs: Sequence[Seq], todo: list[int], groups) -> list[tuple[Unit, list[int]]]:
        """Shared-prefix units for the members of each group still to compute; lone units for the rest."""
        units: list[tuple[Unit, list[int]]] = []
        left = set(todo)
        if self.shares_prefix:
            for group in groups:
                members = [i for i in group if i in left]
                shared, fallback = share_prefix([seqs[i].ids for i in members], [seqs[i].pools for i in members],
                                                self.max_tokens)
                if fallback:
                    self.metrics.prefix_fallback.labels(self.name).inc(fallback)
                for unit, local in shared:
                    units.append((unit, [members[j] for j in local]))
                    left.difference_update(members[j] for j in local)
        units.extend((Unit.single(seqs[i].ids, seqs[i].pools), [i]) for i in todo if i in left)
        return units

    def _settle(self, keys: list[bytes], counts: list[int], item: WorkItem, future: asyncio.Future) -> None:
        for key in keys:
            self.inflight.done(key, item)
        if future.cancelled() or future.exception() is not None:
            return
        if item.work.prefix:
            self.metrics.prefix_saved_tokens.labels(self.name).inc(item.work.full_tokens - item.work.tokens)
        rows, start = future.result(), 0
        for key, n in zip(keys, counts):
            self.cache.store(key, rows[start: start + n])
            start += n

    @staticmethod
    async def _wait(items: list[WorkItem], ticket: Ticket) -> None:
        """Wait for items without cancelling them: another request may share them (single-flight)."""
        if not items:
            return
        futures = [it.future for it in items]
        try:
            await asyncio.wait(futures)
        except asyncio.CancelledError:
            ticket.cancel()  # our client left: items nobody else waits for are dropped before compute
            raise
        for f in futures:
            if f.cancelled():
                ticket.cancel()
                raise bug("an item was dropped while its request still waited for it.")
            if f.exception() is not None:
                ticket.cancel()  # the rest of this request is moot; drop what has not run
                raise f.exception()
