"""The verifier pool: same answers as the checkers, concurrency beyond its size, a hung item killed at its
deadline while the other worker keeps answering, dead workers replaced, cancellation, a clean close."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from rewardserve.verifiers.checks import check
from rewardserve.verifiers.pool import VerifierPool
from tests.conftest import require_tool

HANG = ("regex", {"pattern": "(a+)+$"}, "a" * 40 + "b", None)  # catastrophic backtracking: re cannot stop it
SLOW = ("regex", {"pattern": "(a+)+$"}, "a" * 22 + "b", None)  # the same, finishing in ~0.3 s: "no match"
QUICK = ("exact", {}, "yes", "yes")  # "matched"

ITEMS = [
    ("math", {}, "The answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("math", {}, "I get 8", "7"),
    ("math", {}, "", "7"),
    ("exact", {"case_sensitive": False}, "PARIS", "paris"),
    ("exact", {}, "Lyon", "Paris"),
    ("regex", {"pattern": "answer: {reference}$"}, "answer: 1.5", "1.5"),
    ("regex", {"pattern": "^no$"}, "yes", None),
    ("json_schema", {"schema": {"type": "object", "required": ["a"]}}, '{"a": 1}', None),
    ("json_schema", {"schema": {"type": "object", "required": ["a"]}}, '{"b": 1}', None),
    ("json_schema", {"schema": {"type": "object"}}, "nope", None),
    ("math", {}, "42", None),  # a checker's exception is an answer, not a dead worker
]


def _with_pool(workers: int, body, **options):
    async def run():
        pool = VerifierPool(workers, **options)
        await pool.start()
        try:
            return await body(pool)
        finally:
            await pool.close()

    return asyncio.run(run())


def _wait_for_workers(pool: VerifierPool, n: int):
    async def wait():
        for _ in range(200):
            if len(pool.pids) == n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the pool has {len(pool.pids)} workers, not {n}")

    return wait()


def test_answers_match_the_checkers_for_more_items_than_workers_in_order():
    def expected(task):
        try:
            return check(*task)
        except ValueError:
            return (0.0, "checker error")

    want = [expected(task) for task in ITEMS] * 3

    async def body(pool):
        return await asyncio.gather(*(pool.run(*task, 10.0) for task in ITEMS * 3))

    got = _with_pool(2, body)
    assert got == want
    assert {r for _, r in got} >= {"correct", "wrong answer", "no answer found", "matched", "no match",
                                   "schema satisfied", "schema violated", "not JSON", "checker error"}


def test_a_hung_item_times_out_while_the_other_worker_keeps_answering_and_is_replaced():
    async def body(pool):
        before = pool.pids
        start = time.monotonic()
        hung = asyncio.ensure_future(pool.run(*HANG, 1.0))
        await asyncio.sleep(0.05)
        quick = []
        while not hung.done():  # the other worker answers all along
            quick.append(await pool.run(*QUICK, 5.0))
            await asyncio.sleep(0.01)
        took = time.monotonic() - start
        await _wait_for_workers(pool, 2)
        after = await asyncio.gather(*(pool.run(*QUICK, 5.0) for _ in range(4)))
        return hung.result(), took, quick, before, pool.pids, pool.replacements, after

    hung, took, quick, before, after_pids, replacements, after = _with_pool(2, body)
    assert hung == (0.0, "timed out") and 0.95 < took < 2.0, took
    assert len(quick) > 10 and set(quick) == {(1.0, "matched")}
    assert replacements == 1 and len(set(before) & set(after_pids)) == 1
    assert set(after) == {(1.0, "matched")}


def test_two_hung_items_time_out_together_and_a_waiting_item_is_served_after():
    async def body(pool):
        start = time.monotonic()
        results = await asyncio.gather(pool.run(*HANG, 1.0), pool.run(*HANG, 1.0), pool.run(*QUICK, 5.0))
        return results, time.monotonic() - start, pool.replacements

    results, took, replacements = _with_pool(2, body)
    assert results == [(0.0, "timed out"), (0.0, "timed out"), (1.0, "matched")]
    assert took < 6.0 and replacements == 2


def test_a_worker_killed_from_outside_is_replaced_and_its_item_is_a_checker_error():
    replaced = []

    async def body(pool):
        item = asyncio.ensure_future(pool.run(*HANG, 30.0))
        await asyncio.sleep(0.3)
        [busy] = pool.pids
        os.kill(busy, signal.SIGKILL)
        start = time.monotonic()
        result = await item
        took = time.monotonic() - start
        await _wait_for_workers(pool, 1)
        return result, took, await pool.run(*QUICK, 5.0), pool.pids != [busy]

    result, took, after, new_pid = _with_pool(1, body, on_replace=lambda: replaced.append(1))
    assert result == (0.0, "checker error") and took < 1.0
    assert after == (1.0, "matched") and new_pid and replaced == [1]


def test_a_cancelled_item_never_answers_the_next_one():
    async def body(pool):
        slow = asyncio.ensure_future(pool.run(*SLOW, 30.0))
        await asyncio.sleep(0.05)
        slow.cancel()
        # one worker: the next item waits until the slow answer has been read and thrown away
        nxt = await pool.run(*QUICK, 30.0)
        drained = pool.replacements == 0  # the worker was kept: its late answer was read and dropped
        hung = asyncio.ensure_future(pool.run(*HANG, 0.5))
        await asyncio.sleep(0.05)
        hung.cancel()
        # past the cancelled item's deadline its worker is killed and replaced
        start = time.monotonic()
        again = await pool.run(*QUICK, 30.0)
        return slow.cancelled(), nxt, drained, again, time.monotonic() - start, pool.replacements

    cancelled, nxt, drained, again, waited, replacements = _with_pool(1, body)
    assert cancelled and nxt == (1.0, "matched") and drained and again == (1.0, "matched")
    assert 0.3 < waited < 5.0 and replacements == 1


def test_close_kills_every_worker_and_fails_what_is_pending():
    async def body(pool):
        pids = pool.pids
        running = asyncio.ensure_future(pool.run(*HANG, 30.0))
        waiting = asyncio.ensure_future(pool.run(*QUICK, 30.0))
        await asyncio.sleep(0.2)
        await pool.close()
        await pool.close()  # idempotent
        outcomes = await asyncio.gather(running, waiting, return_exceptions=True)
        with pytest.raises(RuntimeError, match="closed"):
            await pool.run(*QUICK, 1.0)
        return pids, outcomes

    pids, outcomes = _with_pool(1, body)
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        VerifierPool(0)

    async def body(pool):
        with pytest.raises(ValueError, match="timeout_s"):
            await pool.run(*QUICK, 0)
        return await pool.run(*QUICK, 1.0)

    assert _with_pool(1, body) == (1.0, "matched")


ABANDON = """
import asyncio, os
from rewardserve.verifiers.pool import VerifierPool

async def main():
    pool = VerifierPool(2)
    await pool.start()
    asyncio.ensure_future(pool.run("regex", {"pattern": "(a+)+$"}, "a" * 40 + "b", None, 600.0))
    await asyncio.sleep(0.3)
    print(*pool.pids, flush=True)
    os._exit(0)  # a crash: no close()

asyncio.run(main())
"""


def test_workers_die_with_the_server_even_mid_check():
    require_tool(sys.platform.startswith("linux"), "Linux (the parent-death signal, PR_SET_PDEATHSIG)")
    out = subprocess.run([sys.executable, "-c", ABANDON], capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.monotonic() + 5.0
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in pids if _running(p)]
    assert not alive  # the idle one saw its pipe close; the busy one got the kernel's SIGKILL


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False
