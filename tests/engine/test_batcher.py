"""The dynamic batcher: shared batches, token budgets, lanes, admission control, disconnects."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import torch

from rewardserve.config import quick
from rewardserve.engine.batcher import Batcher, Budgets
from rewardserve.engine.types import Lane, Ticket
from rewardserve.engine.workers import Devices, ModelWorkers
from rewardserve.errors import BackendError, Overloaded, RequestTooLarge
from rewardserve.models.units import lone
from rewardserve.monitoring.metrics import Metrics
from tests.helpers import load
from tests.server import serve


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("llama")


def _batches(server) -> tuple[float, float]:
    name = server.name
    return (server.metric("rewardserve_batch_items_count", model=name),
            server.metric("rewardserve_batch_items_sum", model=name))


def test_two_concurrent_requests_share_one_batch(ckpt):
    with serve(*quick(model=str(ckpt), max_wait_ms=300)) as s:
        before = _batches(s)

        async def both():
            async with s.async_client() as c:
                return await asyncio.gather(c.post("/v1/score", json={"items": [{"text": "first request"}]}),
                                            c.post("/v1/score", json={"items": [{"text": "second one"}]}))

        r1, r2 = asyncio.run(both())
        assert r1.status_code == r2.status_code == 200
        after = _batches(s)
        assert after[0] - before[0] == 1 and after[1] - before[1] == 2


def test_items_of_one_request_ride_in_several_batches_with_unchanged_scores(ckpt):
    items = [{"text": f"item number {i} " * (i + 1)} for i in range(5)]
    with serve(*quick(model=str(ckpt), max_wait_ms=1, max_batch_items=2)) as s, s.client() as c:
        before = _batches(s)
        split = c.post("/v1/score", json={"items": items, "cache": False}).json()["rewards"]
        after = _batches(s)
        assert after[0] - before[0] == 3 and after[1] - before[1] == 5
        alone = [c.post("/v1/score", json={"items": [it], "cache": False}).json()["rewards"][0] for it in items]
    assert max(abs(a - b) for a, b in zip(split, alone)) <= 1e-5


def test_token_budget_closes_a_batch(ckpt):
    with serve(*quick(model=str(ckpt), max_wait_ms=200, max_batch_tokens=64, max_length=64)) as s, s.client() as c:
        before = _batches(s)
        r = c.post("/v1/score", json={"items": [{"input_ids": [5] * 40}, {"input_ids": [6] * 40}]})
        assert r.status_code == 200
        assert _batches(s)[0] - before[0] == 2  # 80 tokens do not fit one 64-token batch


def test_overload_gets_429_with_retry_after_and_nothing_is_lost(ckpt):
    with serve(*quick(model=str(ckpt), max_wait_ms=1500, max_queued_tokens=40, max_length=40)) as s:
        results = {}

        def first():
            with s.client() as c:
                results["a"] = c.post("/v1/score", json={"items": [{"input_ids": [5] * 30}]})

        t = threading.Thread(target=first)
        t.start()
        while s.metric("rewardserve_queued_tokens", model=s.name) < 30:
            pass
        with s.client() as c:
            r = c.post("/v1/score", json={"items": [{"input_ids": [6] * 30}]})
            assert r.status_code == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "overloaded"
            big = c.post("/v1/score", json={"items": [{"input_ids": [6] * 30}, {"input_ids": [7] * 30}]})
            assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
        t.join()
        assert results["a"].status_code == 200  # the admitted request is served
        assert s.metric("rewardserve_rejected_requests_total", model=s.name) == 1


def test_requests_whose_client_left_are_dropped_before_compute(ckpt):
    with serve(*quick(model=str(ckpt), max_wait_ms=2000)) as s:
        name = s.name
        tokens_before = s.metric("rewardserve_tokens_total", model=name)
        with s.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/v1/score", json={"items": [{"text": f"nobody will read this {i}"} for i in range(3)]})
        for _ in range(100):
            if s.metric("rewardserve_dropped_items_total", model=name) == 3:
                break
            threading.Event().wait(0.05)
        assert s.metric("rewardserve_dropped_items_total", model=name) == 3
        assert s.metric("rewardserve_tokens_total", model=name) == tokens_before


def test_healthz_answers_while_a_batch_runs(ckpt):
    with serve(*quick(model=str(ckpt), max_wait_ms=1, max_batch_tokens=65536, max_batch_items=256)) as s:
        done = threading.Event()
        health_during = []

        def big():
            with s.client() as c:
                c.post("/v1/score", json={"items": [{"input_ids": [5 + i % 50] * 500} for i in range(128)]})
            done.set()

        t = threading.Thread(target=big)
        t.start()
        with s.client() as c:
            while not done.is_set():
                if c.get("/healthz").status_code == 200 and not done.is_set():
                    health_during.append(True)
        t.join()
        assert health_during, "no /healthz answer came back while the batch was running"


# --- the batcher and worker pool driven directly ---------------------------------------------------

def _futures(items):
    return [it.future for it in items]


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load(ckpt)


def _budgets(max_tokens=16384, max_items=256, max_wait_ms=2.0, max_queued=1_000_000, max_step_ms=0.0) -> Budgets:
    return Budgets(max_tokens, max_items, max_wait_ms / 1000, max_queued, max_step_ms / 1000)


def _pool(backends, metrics) -> ModelWorkers:
    return ModelWorkers(backends, Devices(), metrics, "m")


def test_interactive_lane_goes_before_bulk(loaded):
    async def run():
        metrics = Metrics()
        pool = _pool(loaded.backends, metrics)
        batcher = Batcher(_budgets(max_items=2, max_wait_ms=0), pool, metrics, "m")
        held = await pool.acquire()  # the device is busy: both lanes fill up
        batcher.start()
        order = []
        bulk = _futures(batcher.submit(lone([[5, 6], [7, 8]], None), Lane.bulk, Ticket()))
        inter = _futures(batcher.submit(lone([[9, 10], [11, 12]], None), Lane.interactive, Ticket()))
        for tag, futs in (("bulk", bulk), ("interactive", inter)):
            for f in futs:
                f.add_done_callback(lambda _, tag=tag: order.append(tag))
        pool.release(held)
        await asyncio.gather(*bulk, *inter)
        await batcher.stop()
        return order

    assert asyncio.run(run()) == ["interactive", "interactive", "bulk", "bulk"]


class _PoisonedBackend:
    """Fault injection around a real backend: a batch holding token 13 fails on the device."""

    def __init__(self, inner):
        self.inner, self.device = inner, inner.device

    def score(self, batch):
        if any(13 in ids for unit in batch for ids in unit.suffixes):
            raise RuntimeError("expected a 2-D input to the score head")
        return self.inner.score(batch)


def test_a_failed_batch_fails_only_its_own_items(loaded):
    async def run():
        metrics = Metrics()
        pool = _pool([_PoisonedBackend(loaded.backends[0])], metrics)
        batcher = Batcher(_budgets(max_items=1, max_wait_ms=0), pool, metrics, "m")
        batcher.start()
        ok = _futures(batcher.submit(lone([[5, 6]], None), Lane.interactive, Ticket()))
        bad = _futures(batcher.submit(lone([[13]], None), Lane.bulk, Ticket()))
        later = _futures(batcher.submit(lone([[7, 8]], None), Lane.bulk, Ticket()))
        res = await asyncio.gather(*ok, *bad, *later, return_exceptions=True)
        await batcher.stop()
        return res

    good, failed, after = asyncio.run(run())
    assert isinstance(good, list) and isinstance(after, list)
    assert isinstance(failed, BackendError) and "score head" in failed.message and failed.status == 503


def test_non_finite_scores_are_errors_not_numbers(tiny_ckpt):
    loaded = load(tiny_ckpt("llama", seed=3))
    with torch.no_grad():
        loaded.backends[0].model.embed.weight[13] = float("nan")  # the packed model's embedding table

    async def run():
        metrics = Metrics()
        pool = _pool(loaded.backends, metrics)
        batcher = Batcher(_budgets(max_wait_ms=50), pool, metrics, "m")
        batcher.start()
        futs = _futures(batcher.submit(lone([[5, 6], [5, 13, 6], [7]], None), Lane.interactive, Ticket()))
        res = await asyncio.gather(*futs, return_exceptions=True)
        await batcher.stop()
        return res

    a, b, c = asyncio.run(run())
    assert isinstance(b, BackendError) and "non-finite" in b.message
    assert all(v == v for row in a + c for v in row)  # the neighbours in the same batch are unaffected


def test_admission_rejects_whole_requests(loaded):
    async def run():
        metrics = Metrics()
        pool = _pool(loaded.backends, metrics)
        batcher = Batcher(_budgets(max_queued=10, max_items=1, max_tokens=10), pool, metrics, "m")
        with pytest.raises(RequestTooLarge):
            batcher.submit(lone([[1] * 6, [1] * 6], None), Lane.bulk, Ticket())
        batcher.submit(lone([[1] * 6], None), Lane.bulk, Ticket())
        with pytest.raises(Overloaded) as err:
            batcher.submit(lone([[1] * 5], None), Lane.bulk, Ticket())
        assert err.value.retry_after >= 1 and batcher.queued_tokens == 6

    asyncio.run(run())


class _Recorder:
    """A real backend that notes each batch: its items' first tokens, its tokens, and the pool's measured
    rate when the batch was formed (with one device, the previous batch finished before this one formed)."""

    def __init__(self, inner):
        self.inner, self.device, self.batches, self.pool = inner, inner.device, [], None

    def score(self, batch):
        self.batches.append(([u.suffixes[0][0] for u in batch], sum(u.tokens for u in batch),
                             self.pool.tokens_per_second))
        return self.inner.score(batch)


def _distinct(first: int, n: int) -> list[list[int]]:
    """n items of 120 tokens that begin with `first` and share nothing after it (items that begin alike
    would share their beginnings, and a batch of them compute far fewer tokens than it holds)."""
    return [[first] + [10 + i] * 119 for i in range(n)]


def _bulk_then_interactive(loaded, max_step_ms: float):
    """60 bulk items of 120 tokens queue behind a busy device; an interactive item arrives while the
    first bulk batch runs. -> the recorded batches, and the index of the batch the interactive item rode in."""
    async def run():
        metrics = Metrics()
        recorder = _Recorder(loaded.backends[0])
        pool = recorder.pool = _pool([recorder], metrics)
        batcher = Batcher(_budgets(max_step_ms=max_step_ms, max_wait_ms=0), pool, metrics, "m")
        batcher.start()
        await asyncio.gather(*_futures(batcher.submit(lone(_distinct(3, 4), None), Lane.bulk, Ticket())))  # a rate
        recorder.batches.clear()
        held = await pool.acquire()
        bulk = _futures(batcher.submit(lone(_distinct(5, 60), None), Lane.bulk, Ticket()))
        pool.release(held)
        while not recorder.batches:
            await asyncio.sleep(0.001)
        running = len(recorder.batches) - 1
        inter = _futures(batcher.submit(lone([[9] * 10], None), Lane.interactive, Ticket()))
        await asyncio.gather(*bulk, *inter)
        await batcher.stop()
        rode = next(i for i, (firsts, _, _) in enumerate(recorder.batches) if 9 in firsts)
        return recorder.batches, rode - running

    return asyncio.run(run())


def test_a_step_holds_what_the_device_computes_in_max_step_and_interactive_items_wait_one_step(loaded):
    batches, after = _bulk_then_interactive(loaded, max_step_ms=20)
    for firsts, tokens, rate in batches:
        assert rate > 0
        assert len(firsts) == 1 or tokens <= rate * 0.020, (tokens, rate)
    assert len(batches) > 3, "the 7,200 queued tokens should have been cut into short steps"
    assert after == 1, "the interactive item should ride in the batch right after the one it arrived during"


def test_without_max_step_a_batch_fills_to_max_batch_tokens(loaded):
    batches, after = _bulk_then_interactive(loaded, max_step_ms=0)
    assert batches[0][1] == 60 * 120  # every queued bulk item in the first batch
    assert after == 1
