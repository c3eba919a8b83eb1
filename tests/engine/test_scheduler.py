"""The scheduler's pieces driven directly: single-flight (also into shared-prefix groups), duplicates
within a request, grouping, and devices shared by several models."""

from __future__ import annotations

import asyncio

import pytest

from rewardserve.config import quick
from rewardserve.engine.grouping import MIN_SHARED_PREFIX, share_prefix
from rewardserve.engine.registry import Registry
from rewardserve.engine.scheduler import Seq
from rewardserve.engine.types import Lane, Ticket
from rewardserve.engine.workers import Devices
from rewardserve.monitoring.metrics import Metrics

PREFIX = list(range(10, 40))


def _seq(ids):
    return Seq(ids, (len(ids) - 1,))


async def _started(path) -> Registry:
    settings, registry = quick(model=str(path), warmup=False, monitoring=False, max_wait_ms=0)
    reg = Registry(settings, registry, Metrics())
    await reg.start()
    return reg


async def _hold(reg: Registry) -> list:
    """Every place on the cpu worker (an engine process's worker holds two batches)."""
    return [await reg.devices.acquire(frozenset({"cpu"})) for _ in range(reg.devices.workers["cpu"].depth)]


def _let_go(reg: Registry, held: list) -> None:
    for w in held:
        reg.devices.release(w)


def test_identical_items_join_one_computation_even_inside_a_group(tiny_ckpt):
    async def run():
        reg = await _started(tiny_ckpt("llama"))
        runner = reg.get(None).runner
        def shared():
            return reg.metrics.registry.get_sample_value("rewardserve_singleflight_shared_items_total",
                                                         {"model": runner.name})

        held = await _hold(reg)  # the device is busy: everything queues
        group = [_seq(PREFIX + [50 + i] * (i + 1)) for i in range(3)]
        a = asyncio.ensure_future(runner.run(group, lane=Lane.interactive, ticket=Ticket(), groups=[[0, 1, 2]]))
        await asyncio.sleep(0)
        assert sum(len(q) for q in runner.batcher.lanes) == 1  # one shared-prefix unit
        b = asyncio.ensure_future(runner.run([group[1], group[1], _seq([7, 8, 9])], lane=Lane.bulk, ticket=Ticket()))
        await asyncio.sleep(0)
        assert shared() == 1  # group[1] joined a's unit; its copy joined it within the request
        assert sum(len(q) for q in runner.batcher.lanes) == 2  # only [7, 8, 9] was added
        _let_go(reg, held)
        ra, rb = await a, await b
        alone = await runner.run([group[1]], lane=Lane.interactive, ticket=Ticket(), use_cache=False)
        await reg.stop()
        return ra, rb, alone

    ra, rb, alone = asyncio.run(run())
    assert rb[0] == rb[1] and rb[0][0] == ra[1][0] and not rb[0][1]
    assert abs(rb[0][0][0][0] - alone[0][0][0][0]) <= 1e-5  # the shared-prefix row is the item's own score


def test_cache_hits_skip_the_queue(tiny_ckpt):
    async def run():
        reg = await _started(tiny_ckpt("llama"))
        runner = reg.get(None).runner
        first = await runner.run([_seq([5, 6, 7])], lane=Lane.interactive, ticket=Ticket())
        held = await _hold(reg)
        again = await asyncio.wait_for(runner.run([_seq([5, 6, 7])], lane=Lane.interactive, ticket=Ticket()), 5)
        _let_go(reg, held)
        await reg.stop()
        return first, again

    first, again = asyncio.run(run())
    assert again == [(first[0][0], True)] and first[0][1] is False


def test_share_prefix_units_respect_the_budget_and_leave_out_members_pooled_inside():
    seqs = [PREFIX + [1] * n for n in (5, 6, 7, 8)] + [PREFIX + [0] * 4]
    pools = [(len(s) - 1,) for s in seqs[:4]] + [(len(PREFIX) - 1,)]  # a response of pad ids: pooled in the prefix
    units, fallback = share_prefix(seqs, pools, max_tokens=len(PREFIX) + 12)
    assert fallback == 1
    assert [members for _, members in units] == [[0, 1]]  # 0 and 1 fill the budget; 2 and 3 alone score alone
    [(unit, _)] = units
    assert unit.prefix == PREFIX and unit.suffixes == [[1] * 5, [1] * 6] and unit.pools == [(4,), (5,)]
    short = share_prefix([[1] * (MIN_SHARED_PREFIX - 1) + [2], [1] * (MIN_SHARED_PREFIX - 1) + [3]],
                         [(MIN_SHARED_PREFIX - 1,)] * 2, 10**6)
    assert short == ([], 0)  # too little to share


def test_devices_go_to_waiters_in_order_least_recently_used_first():
    async def run():
        d = Devices()
        for name in ("cpu:0", "cpu:1"):
            d.add(name)
        both = frozenset({"cpu:0", "cpu:1"})
        w1 = await d.acquire(frozenset({"cpu:0"}))
        w2 = await d.acquire(frozenset({"cpu:1"}))
        order = []

        async def wait(tag, devices):
            w = await d.acquire(devices)
            order.append((tag, w.device))
            return w

        x = asyncio.ensure_future(wait("x", frozenset({"cpu:0"})))
        y = asyncio.ensure_future(wait("y", both))
        z = asyncio.ensure_future(wait("z", both))
        await asyncio.sleep(0)
        cancelled = asyncio.ensure_future(wait("cancelled", both))
        await asyncio.sleep(0)
        cancelled.cancel()
        d.release(w2)  # cpu:1: x cannot use it, y can
        await asyncio.sleep(0)
        d.release(w1)  # cpu:0: x first
        await asyncio.sleep(0)
        d.release(await y)  # z next; the cancelled waiter gets nothing
        await asyncio.sleep(0)
        await asyncio.gather(x, z, return_exceptions=True)
        lru = Devices()
        for name in ("a", "b"):
            lru.add(name)
        seen = []
        for _ in range(4):
            w = await lru.acquire(frozenset({"a", "b"}))
            seen.append(w.device)
            lru.release(w)
        return order, seen

    order, seen = asyncio.run(run())
    assert order == [("y", "cpu:1"), ("x", "cpu:0"), ("z", "cpu:1")]
    assert seen[0] != seen[1] and seen[:2] == seen[2:]  # consecutive batches alternate between free devices


@pytest.mark.parametrize("fail_first", [True, False])
def test_gather_or_cancel_stops_the_others_at_the_first_failure(fail_first):
    from rewardserve.aio import gather_or_cancel

    async def run():
        cancelled = []

        async def slow():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        async def boom():
            raise ValueError("member failed")

        parts = [boom(), slow()] if fail_first else [slow(), boom()]
        with pytest.raises(ValueError, match="member failed"):
            await gather_or_cancel(*parts)
        return cancelled, await gather_or_cancel(asyncio.sleep(0, "a"), asyncio.sleep(0, "b"))

    cancelled, ok = asyncio.run(run())
    assert cancelled == [True] and ok == ["a", "b"]
