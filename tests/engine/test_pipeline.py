"""Two batches in flight per engine process: the second waits in the engine's pipe while the first
computes, answers come back to the right callers in order, a dead engine fails both, and the batcher
collects the second batch only when the first is nearly done."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from rewardserve.config import quick
from rewardserve.engine.process import EngineDied
from rewardserve.engine.workers import Devices, ModelWorkers
from rewardserve.models.units import Unit
from rewardserve.monitoring.metrics import Metrics
from tests.server import serve

ITEMS = [{"text": f"pipelined item {i}: " + "word " * (2 + i)} for i in range(4)]


@pytest.fixture
def server(tiny_ckpt):
    with serve(*quick(model=str(tiny_ckpt("llama")), lru_items=0, engine="process", max_wait_ms=0)) as s:
        [s.engine] = s.registry.engines.values()
        s.backend = s.registry.get(None).runner.batcher.pool.backends["cpu"]
        yield s


def _units(n: int, seed: int) -> list[Unit]:
    return [Unit.single([3 + (seed * 7 + i * 5 + j) % 40 for j in range(4 + i)], (3 + i,)) for i in range(n)]


def _in_threads(calls) -> list:
    """Run each call in a thread of its own; their results (or exceptions), in order."""
    results: list = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, results


def _wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_second_batch_is_sent_before_the_first_is_answered_and_each_gets_its_own_answer(server):
    a, b = _units(5, seed=1), _units(3, seed=2)
    alone = [server.backend.score(a).scores.tolist(), server.backend.score(b).scores.tolist()]
    os.kill(server.engine.pid, signal.SIGSTOP)  # the engine holds still: both batches must wait in its pipe
    try:
        threads, results = _in_threads([lambda: server.backend.score(a), lambda: server.backend.score(b)])
        _wait_for(lambda: len(server.engine._link.waiting) == 2, "both batches were sent to the stopped engine")
    finally:
        os.kill(server.engine.pid, signal.SIGCONT)
    for t in threads:
        t.join(60)
    assert [r.scores.tolist() for r in results] == alone  # bit for bit, each to its own caller
    assert all(r.seconds is not None and r.seconds > 0 for r in results)  # the engine's own time, not the wait


def test_a_dead_engine_fails_every_batch_waiting_on_it_and_restarts_with_its_models(server):
    a, b = _units(2, seed=3), _units(2, seed=4)
    ref = server.backend.score(a).scores.tolist()
    pid = server.engine.pid
    os.kill(pid, signal.SIGSTOP)
    threads, results = _in_threads([lambda: server.backend.score(a), lambda: server.backend.score(b)])
    _wait_for(lambda: len(server.engine._link.waiting) == 2, "both batches were sent to the stopped engine")
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert all(isinstance(r, EngineDied) and "died (exit code -9)" in str(r) for r in results), results
    assert not server.engine.alive
    with pytest.raises(EngineDied):  # a later call fails at once instead of waiting on a dead pipe
        server.backend.score(a)
    server.engine.restart()
    assert server.engine.pid != pid and server.backend.score(a).scores.tolist() == ref


def test_an_engine_killed_with_two_batches_in_flight_is_replaced_once(server):
    with server.client() as c:
        ref = c.post("/v1/score", json={"items": ITEMS, "cache": False}).json()["rewards"]
        worker = server.registry.devices.workers["cpu"]
        assert worker.depth == 2
        pid = server.engine.pid
        os.kill(pid, signal.SIGSTOP)

        def post(i):
            with server.client() as own:
                return own.post("/v1/score", json={"items": [ITEMS[i]], "cache": False})

        threads, results = _in_threads([lambda: post(0), lambda: post(1)])
        _wait_for(lambda: worker.in_flight == 2 and len(server.engine._link.waiting) == 2,
                  "two batches in the stopped engine's pipe")
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [503, 503]
        assert all("engine process for cpu died" in r.json()["error"]["message"] for r in results)
        _wait_for(lambda: c.get("/readyz").status_code == 200, "the probe restarted the engine")
        assert server.engine.restarts == 1 and server.metric("rewardserve_worker_replacements_total", device="cpu") == 1
        assert c.post("/v1/score", json={"items": ITEMS, "cache": False}).json()["rewards"] == ref


def test_an_idle_device_goes_before_a_busy_ones_second_place_and_a_worker_being_replaced_waits():
    async def run():
        d = Devices()
        d.add("a", depth=2)
        d.add("b", depth=2)
        both = frozenset({"a", "b"})
        got = [(await d.acquire(both)).device for _ in range(4)]
        assert got[0] != got[1] and sorted(got) == ["a", "a", "b", "b"]
        assert all(w.busy for w in d.workers.values())
        fifth = asyncio.ensure_future(d.acquire(both))
        await asyncio.sleep(0)
        assert not fifth.done()
        d.release(d.workers["a"])
        assert (await fifth).device == "a"

        d.release(d.workers["b"])
        d.workers["b"].replacing = "its thread was replaced"
        waiter = asyncio.ensure_future(d.acquire(frozenset({"b"})))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # b has a free place, but its probe has not run
        d.workers["b"].replacing = None
        d.wake()
        assert (await waiter).device == "b"

    asyncio.run(run())


class _Backend:
    device = "cpu"
    shares_prefix = False
    engine = object()  # a worker whose batches run in an engine process holds two


def test_the_second_batch_is_collected_shortly_before_the_first_is_due_or_when_it_ends():
    async def run():
        pool = ModelWorkers([_Backend()], Devices(), Metrics(), "m")
        first = await pool.acquire()
        start = time.perf_counter()
        await pool.next_batch_due(first)  # nothing runs on it: at once
        assert time.perf_counter() - start < 0.5
        second = await pool.acquire()
        assert second is first and first.in_flight == 2
        first.due = time.perf_counter() + 0.2
        start = time.perf_counter()
        await pool.next_batch_due(first)
        waited = time.perf_counter() - start
        assert 0.15 <= waited < 5  # until shortly before the first batch is due

        first.due = time.perf_counter() + 30
        asyncio.get_running_loop().call_later(0.05, pool.release, first)  # the first batch ends early
        start = time.perf_counter()
        await pool.next_batch_due(first)
        assert time.perf_counter() - start < 10

    asyncio.run(run())


def test_a_batch_that_cannot_be_sent_fails_alone_and_the_next_answers_stay_in_line(server):
    a = _units(2, seed=5)
    ref = server.backend.score(a).scores.tolist()
    with pytest.raises(Exception, match="pickle"):
        server.engine._call("score", 0, [lambda: None])  # a payload that does not pickle
    assert server.engine.alive and server.backend.score(a).scores.tolist() == ref


def test_device_busy_and_batch_time_count_the_engines_own_time_not_the_wait_in_its_pipe(server):
    """Two batches wait a second in a stopped engine's pipe: counted by wall time here, that second
    would count twice as device time (and overlapping batches would make a device more than 100% busy)."""
    labels = dict(model=server.name, device="cpu")
    before = (server.metric("rewardserve_device_busy_seconds_total", **labels),
              server.metric("rewardserve_inference_duration_seconds_sum", **labels),
              server.metric("rewardserve_inference_duration_seconds_count", **labels))
    os.kill(server.engine.pid, signal.SIGSTOP)
    try:
        def post(i):
            with server.client() as own:
                return own.post("/v1/score", json={"items": [ITEMS[i]], "cache": False})

        threads, results = _in_threads([lambda: post(0), lambda: post(1)])
        _wait_for(lambda: len(server.engine._link.waiting) == 2, "two batches in the stopped engine's pipe")
        time.sleep(1.0)
    finally:
        os.kill(server.engine.pid, signal.SIGCONT)
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200]
    busy, seconds, batches = (server.metric("rewardserve_device_busy_seconds_total", **labels) - before[0],
                              server.metric("rewardserve_inference_duration_seconds_sum", **labels) - before[1],
                              server.metric("rewardserve_inference_duration_seconds_count", **labels) - before[2])
    assert batches == 2 and 0 < busy < 0.5 and 0 < seconds < 0.5
