"""Faults stay small: out of memory (the batch is retried in halves), a stuck batch and a dead worker
thread (replaced), a lost device (out of service, said by /readyz and /healthz), deadlines (never
computed past them), and a restarted server finding its Redis from the first request."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import pytest
import torch

from rewardserve.config import quick
from tests.redis_helper import RedisProcess
from tests.server import serve

ITEMS = [{"text": f"item {i}: " + "word " * (3 + i)} for i in range(6)]


class Faulty:
    """Around a real backend: `fail(units)` decides, batch by batch, what goes wrong."""

    def __init__(self, inner, fail):
        self.inner, self.device, self.shares_prefix, self.fail = inner, inner.device, inner.shares_prefix, fail
        self.calls: list[int] = []

    def score(self, units):
        self.calls.append(len(units))
        self.fail(units)
        return self.inner.score(units)


@pytest.fixture
def server(tiny_ckpt):
    with serve(*quick(model=str(tiny_ckpt("llama")), max_wait_ms=50, lru_items=0, batch_timeout_s=1.0)) as s:
        pool = s.registry.get(None).runner.batcher.pool
        s.pool, s.real = pool, pool.backends["cpu"]
        yield s


def _inject(server, fail) -> Faulty:
    faulty = Faulty(server.real, fail)
    server.pool.backends["cpu"] = faulty
    return faulty


def _reference(server) -> list[float]:
    with server.client() as c:
        return c.post("/v1/score", json={"items": ITEMS, "cache": False}).json()["rewards"]


def test_out_of_memory_retries_the_batch_in_halves(server):
    ref = _reference(server)

    def oom(units):
        if len(units) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    faulty = _inject(server, oom)
    with server.client() as c:
        r = c.post("/v1/score", json={"items": ITEMS, "cache": False})
    assert r.status_code == 200 and r.json()["rewards"] == pytest.approx(ref, abs=1e-5)
    assert faulty.calls == [6, 3, 1, 2, 3, 1, 2]  # 6 runs out, each 3 runs out, then 1 + 2 and 1 + 2 run
    assert server.metric("rewardserve_oom_splits_total", model=server.name, device="cpu") == 3


def test_a_unit_out_of_memory_even_alone_fails_alone(server):
    def oom(units):
        if any(len(s) > 60 for u in units for s in u.suffixes):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9999999 bytes")

    _inject(server, oom)
    big = {"text": "word " * 80}
    with server.client() as c:
        r = c.post("/v1/score", json={"items": [ITEMS[0], big, ITEMS[1]], "cache": False})
        assert r.status_code == 503 and "can't allocate memory" in r.json()["error"]["message"]
        assert c.post("/v1/score", json={"items": [ITEMS[0], ITEMS[1]], "cache": False}).status_code == 200


def test_a_worker_thread_that_is_gone_is_replaced(server):
    ref = _reference(server)
    worker = server.registry.devices.workers["cpu"]
    worker.executor.shutdown(wait=True)  # as if its thread had died
    with server.client() as c:
        r = c.post("/v1/score", json={"items": ITEMS, "cache": False})
        assert r.status_code == 200 and r.json()["rewards"] == pytest.approx(ref, abs=1e-5)
        assert server.metric("rewardserve_worker_replacements_total", device="cpu") == 1
        for _ in range(100):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200


def test_a_stuck_batch_fails_and_its_worker_gets_a_fresh_thread(server):
    release = threading.Event()
    state = {"stuck": True}

    def hang(units):
        if state.pop("stuck", False):
            release.wait(10)  # longer than batch_timeout_s (1 s)

    _inject(server, hang)
    try:
        with server.client() as c:
            r = c.post("/v1/score", json={"items": ITEMS[:2], "cache": False})
            assert r.status_code == 503 and "batch_timeout_s" in r.json()["error"]["message"]
            ready = c.get("/readyz")
            if ready.status_code == 503:  # while the fresh thread's probe runs
                assert ready.json()["error"]["type"] == "worker_replaced"
            assert c.post("/v1/score", json={"items": ITEMS[2:], "cache": False}).status_code == 200
            assert server.metric("rewardserve_worker_replacements_total", device="cpu") == 1
    finally:
        release.set()


def test_a_lost_device_is_taken_out_of_service(server):
    def lost(units):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    _inject(server, lost)
    with server.client() as c:
        assert c.post("/v1/score", json={"items": ITEMS[:1], "cache": False}).status_code == 503
        ready, health = c.get("/readyz"), c.get("/healthz")
        assert ready.status_code == health.status_code == 503
        assert ready.json()["error"]["type"] == "device_lost" and "illegal memory access" in health.text
        r = c.post("/v1/score", json={"items": ITEMS[1:2], "cache": False})
        assert r.status_code == 503 and "out of service" in r.json()["error"]["message"]


def test_an_item_past_its_deadline_is_never_computed(tiny_ckpt):
    # no warm-up: no batch has run, so admission has no waits to refuse these deadlines with
    settings = quick(model=str(tiny_ckpt("llama")), max_wait_ms=1500, lru_items=0, warmup=False)
    with serve(*settings) as s, s.client() as c:
        tokens = s.metric("rewardserve_tokens_total", model=s.name)
        r = c.post("/v1/score", json={"items": ITEMS[:2], "timeout": 0.3})
        assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded"
        assert "0.3 s" in r.json()["error"]["message"] and "timeout field" in r.json()["error"]["message"]
        header = c.post("/v1/score", json={"items": ITEMS[2:3]}, headers={"X-Request-Timeout": "0.2"})
        assert header.status_code == 504 and "X-Request-Timeout" in header.json()["error"]["message"]
        time.sleep(1.6)  # the batch would have closed by now
        assert s.metric("rewardserve_tokens_total", model=s.name) == tokens
        assert s.metric("rewardserve_dropped_items_total", model=s.name) == 3
        bad = c.post("/v1/score", json={"items": ITEMS[:1]}, headers={"X-Request-Timeout": "soon"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "X-Request-Timeout"


def test_a_deadline_long_enough_is_met_and_capped_by_the_server(tiny_ckpt):
    with serve(*quick(model=str(tiny_ckpt("llama")), max_wait_ms=400, max_request_timeout_s=0.2)) as s, s.client() as c:
        r = c.post("/v1/score", json={"items": ITEMS[:1], "timeout": 30})
        assert r.status_code == 504 and "max_request_timeout_s" in r.json()["error"]["message"]


def test_a_restarted_server_finds_its_redis_from_the_first_request(tiny_ckpt):
    redis = RedisProcess().start()
    try:
        settings = dict(model=str(tiny_ckpt("llama")), redis_url=redis.url, lru_items=0, max_wait_ms=1)
        items = [{"text": f"restart item {i}"} for i in range(20)]
        with serve(*quick(**settings)) as s, s.client() as c:
            first = c.post("/v1/score", json={"items": items}).json()["rewards"]
        assert len(redis.client().keys("rs:*")) == 20  # every write-back arrived before the server was gone
        with serve(*quick(**settings)) as s, s.client() as c:
            again = c.post("/v1/score", json={"items": items}).json()
            assert s.metric("rewardserve_cache_hits_total", model=s.name, tier="redis") == 20
        assert again["rewards"] == first and all(it["cached"] for it in again["items"])
    finally:
        redis.kill()


def test_concurrent_requests_never_leave_state_behind(tiny_ckpt):
    """Single-flight entries and tickets go with their requests: nothing outlives them."""
    with serve(*quick(model=str(tiny_ckpt("llama")), max_wait_ms=5)) as s:
        async def burst():
            async with s.async_client() as ac:
                await asyncio.gather(*(ac.post("/v1/score", json={"items": [{"text": f"t{i % 7}"}]})
                                       for i in range(60)))

        asyncio.run(burst())
        runner = s.registry.get(None).runner
        assert runner.inflight._by_key == {} and runner.batcher.queued_tokens == 0
        assert not any(runner.batcher.lanes)


def test_a_killed_engine_process_is_started_again_with_its_models(tiny_ckpt):
    with serve(*quick(model=str(tiny_ckpt("llama")), lru_items=0, engine="process")) as s, s.client() as c:
        ref = _reference(s)
        [engine] = s.registry.engines.values()
        first = engine.pid
        os.kill(first, signal.SIGKILL)
        r = c.post("/v1/score", json={"items": ITEMS, "cache": False})
        assert r.status_code == 503 and "engine process for cpu died" in r.json()["error"]["message"]
        for _ in range(600):  # the probe starts a new engine and builds the model again
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200 and engine.pid != first and engine.restarts == 1
        again = c.post("/v1/score", json={"items": ITEMS, "cache": False}).json()["rewards"]
        assert again == ref  # the same weights, the same maths: bit for bit
        assert s.metric("rewardserve_worker_replacements_total", device="cpu") == 1


def test_an_engine_whose_pipe_broke_counts_as_dead_even_before_its_process_is_reaped(tiny_ckpt):
    """The pipe closes before the OS reaps a killed engine: the probe must start a new engine then too.
    A stopped engine whose socket is shut holds that moment still: its process is alive, its pipe is not."""
    with serve(*quick(model=str(tiny_ckpt("llama")), lru_items=0, engine="process")) as s, s.client() as c:
        ref = _reference(s)
        [engine] = s.registry.engines.values()
        first = engine.pid
        os.kill(first, signal.SIGSTOP)
        socket.socket(fileno=os.dup(engine._link.conn.fileno())).shutdown(socket.SHUT_RDWR)
        r = c.post("/v1/score", json={"items": ITEMS, "cache": False})
        assert r.status_code == 503 and "engine process for cpu died (exit code -9)" in r.json()["error"]["message"]
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200 and engine.pid != first and engine.restarts == 1
        assert c.post("/v1/score", json={"items": ITEMS, "cache": False}).json()["rewards"] == ref
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # the stopped engine was killed and reaped, not left behind


def test_engine_processes_give_the_in_process_scores_bit_for_bit(tiny_ckpt):
    scores = {}
    for engine in ("process", "thread"):
        with serve(*quick(model=str(tiny_ckpt("qwen2")), lru_items=0, engine=engine)) as s, s.client() as c:
            scores[engine] = c.post("/v1/score", json={"items": ITEMS}).json()["rewards"]
            assert bool(s.registry.engines) == (engine == "process")
    assert scores["process"] == scores["thread"]


def test_the_cpu_engine_runs_the_thread_count_that_measured_faster_and_tries_the_other_ever_more_rarely():
    from rewardserve.engine.process import ThreadChooser

    chooser = ThreadChooser(cores=4, explore=4, explore_max=64)
    assert chooser.choices == [3, 4]

    def run(batches: int, rates: dict[int, float]) -> list[int]:
        picks = []
        for _ in range(batches):
            threads = chooser.pick()
            chooser.record(threads, tokens=int(rates[threads]), seconds=1.0)
            picks.append(threads)
        return picks

    busy_front_end = {3: 3000.0, 4: 2000.0}  # all cores measure slower
    picks = run(200, busy_front_end)
    assert picks[:2] == [3, 4]  # each is measured once before any is preferred
    tries = picks[2:].count(4)
    assert 3 <= tries <= 6, picks  # tried after 4, 8, 16, 32, 64, 64 ... batches: a settled choice costs little
    quiet_front_end = {3: 3000.0, 4: 6000.0}  # now all cores win, and after at most explore_max batches are found to
    picks = run(200, quiet_front_end)
    assert picks[-100:].count(4) >= 95, picks
    assert ThreadChooser(cores=1).choices == [1]
