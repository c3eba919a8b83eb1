"""A process pool for the checkers that never blocks the event loop and kills an item past its deadline.

Hand-written because concurrent.futures.ProcessPoolExecutor cannot kill one hung task (a catastrophic
regex, a power tower in SymPy) without breaking the whole pool. Each worker is a process with a
pipe: it imports the checkers once and answers (score, reason) per task. Idle workers wait in an
asyncio queue, so items beyond the pool size wait for one; the parent waits on a worker's pipe with
`loop.add_reader` (no thread per item) and a timer:

- answer first: the answer is the item's result and the worker goes back to the queue;
- timer first: the worker is SIGKILLed and replaced, and the item gets (0.0, "timed out");
- the pipe closes first (the worker died, e.g. the OOM killer): it is replaced, and the item gets
  (0.0, "checker error"), not retried: an item that kills its worker would kill a second one too.

An item whose caller is cancelled keeps its worker until the answer (read and discarded) or the
deadline (killed and replaced), so a late answer can never reach the next item. `timeout_s`
bounds the check, counted from dispatch, not the wait for a worker. Workers are started off the
event loop and report ready only once the checkers are loaded and warm (so a start never eats into
an item's timeout); with the forkserver method they fork from a server that has already imported
SymPy and math-verify, so a replacement is cheap. As with any multiprocessing start method but fork,
each worker imports the `__main__` module: a script that starts a pool needs the `__main__` guard.
The pool belongs to the event loop that ran `start()`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any, Callable

from rewardserve.runtime import prepare_forkserver

log = logging.getLogger(__name__)

TIMED_OUT = (0.0, "timed out")
CRASHED = (0.0, "checker error")
_READY = "ready"
_CLOSED = object()  # in the idle queue after close(): each waiter that takes it puts it back for the next
_START_S = 60.0  # a new worker must import and warm up the checkers within this
_RETRY_S = 1.0  # between attempts to start a replacement that failed to start
# Run once in each new worker: first calls load the LaTeX parser and build caches.
_WARMUP = (("math", {}, "$1$", "1"), ("json_schema", {"schema": {"type": "object"}}, "{}", None))


def _die_with_server() -> None:
    """Linux, forkserver: be SIGKILLed when the server dies, even while a checker spins in C (an idle
    worker just sees its pipe close). The kernel signals when the parent, the forkserver, exits; the
    forkserver exits once no process holds its "alive" pipe, and every child it forks inherits that
    pipe, so a worker closes its copy (a private attribute, hence the guards)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        from multiprocessing import forkserver

        server = forkserver._forkserver
        if server._forkserver_alive_fd is not None:
            os.close(server._forkserver_alive_fd)
            server._forkserver_alive_fd = None
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


def _worker_main(conn: Connection, forked_by_server: bool) -> None:
    """A worker: answer tasks until the pipe closes or a None arrives; a checker's exception is an answer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's; it closes the pool
    if forked_by_server:  # (with spawn or fork the parent is an executor thread: no death signal)
        _die_with_server()
    from rewardserve.verifiers.checks import check

    for task in _WARMUP:
        try:
            check(*task)
        except Exception:  # a missing library shows up on real items, as "checker error"
            pass
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            score, reason = check(*task)
            answer = (float(score), str(reason))
        except Exception:
            log.warning("the %s checker failed", task[0], exc_info=True)
            answer = CRASHED
        conn.send(answer)


class _Worker:
    __slots__ = ("process", "conn", "fd", "waiter", "timer")

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection):
        self.process = process
        self.conn = conn
        self.fd = conn.fileno()
        self.waiter: asyncio.Future | None = None  # the item in flight's result, None while idle
        self.timer: asyncio.TimerHandle | None = None


class VerifierPool:
    """`workers` processes running `checks.check`; `run` is the only call an item needs."""

    def __init__(self, workers: int, start_method: str | None = None, on_replace: Callable[[], Any] | None = None):
        if workers < 1:
            raise ValueError(f"a verifier pool needs at least one worker, not {workers}")
        self.size = workers
        # forkserver on Linux (cheap, fork-safe); spawn elsewhere. None picks by platform.
        self.start_method = start_method or ("forkserver" if sys.platform.startswith("linux") else "spawn")
        self._ctx = multiprocessing.get_context(self.start_method)
        self._on_replace = on_replace
        self.replacements = 0  # workers killed (past a deadline) or found dead, and replaced
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Queue | None = None
        self._workers: set[_Worker] = set()
        self._respawns: set[asyncio.Task] = set()
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The live workers' process ids."""
        return sorted(w.process.pid for w in self._workers)

    async def start(self) -> None:
        if self._idle is not None or self._closed:
            raise RuntimeError("a verifier pool starts once")
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Queue()
        if self.start_method == "forkserver":
            prepare_forkserver(self._ctx)
        started = await asyncio.gather(*(self._loop.run_in_executor(None, self._spawn) for _ in range(self.size)),
                                       return_exceptions=True)
        failed = [r for r in started if isinstance(r, BaseException)]
        for worker in started:
            if not isinstance(worker, BaseException):
                self._workers.add(worker)
                self._idle.put_nowait(worker)
        if failed:
            await self.close()
            raise RuntimeError(f"{len(failed)} of {self.size} verifier processes did not start") from failed[0]

    async def run(self, kind: str, config: dict[str, Any], response: str, reference: str | None,
                  timeout_s: float) -> tuple[float, str]:
        """(score, reason) of one item, within about `timeout_s` of its dispatch to a worker."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        task = (kind, config, response, reference)
        for _ in range(self.size + 1):
            worker = await self._take()
            try:
                worker.conn.send(task)
            except OSError:  # it died while idle: the item never ran, so another worker takes it
                self._replace(worker)
                continue
            except BaseException:  # e.g. an unpicklable config: nothing was written, the worker is fine
                self._idle.put_nowait(worker)
                raise
            worker.waiter = self._loop.create_future()
            self._loop.add_reader(worker.fd, self._on_answer, worker)
            worker.timer = self._loop.call_later(timeout_s, self._on_deadline, worker)
            return await worker.waiter  # cancelled: the callbacks above still recycle the worker
        return CRASHED

    async def close(self) -> None:
        """Kill every worker and wait for them; items in flight or waiting get RuntimeError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._idle is None:
            return
        await asyncio.gather(*self._respawns, return_exceptions=True)  # they see _closed and stop
        workers, self._workers = list(self._workers), set()
        for worker in workers:
            self._disarm(worker)
            self._settle(worker, RuntimeError("the verifier pool closed while the item was being checked"))
            self._kill(worker)
        self._idle.put_nowait(_CLOSED)
        await self._loop.run_in_executor(None, _reap, [w.process for w in workers])

    # --- internals -------------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        """Start a worker and wait until it has loaded the checkers (blocking: run off the event loop)."""
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child, self.start_method == "forkserver"),
                                    name="rewardserve-verifier", daemon=True)
        process.start()
        child.close()  # only the worker holds its end now, so its death closes the pipe
        try:
            if not parent.poll(_START_S):
                raise RuntimeError(f"a verifier process did not load the checkers within {_START_S:.0f} s")
            if parent.recv() != _READY:
                raise RuntimeError("a verifier process answered before it was asked. This is a bug.")
        except BaseException:
            process.kill()
            process.join()
            parent.close()
            raise
        return _Worker(process, parent)

    async def _take(self) -> _Worker:
        if self._idle is None:
            raise RuntimeError("start() the verifier pool before running items")
        if self._closed:
            raise RuntimeError("the verifier pool is closed")
        worker = await self._idle.get()
        if worker is _CLOSED:
            self._idle.put_nowait(_CLOSED)
        if self._closed:  # a worker handed over just before close() is dead now
            raise RuntimeError("the verifier pool is closed")
        return worker

    def _on_answer(self, worker: _Worker) -> None:
        self._disarm(worker)
        try:
            answer = worker.conn.recv()
        except (EOFError, OSError):  # it died mid-item
            self._replace(worker)
            self._settle(worker, CRASHED)
            return
        self._settle(worker, answer)
        self._idle.put_nowait(worker)

    def _on_deadline(self, worker: _Worker) -> None:
        self._disarm(worker)
        self._replace(worker)
        self._settle(worker, TIMED_OUT)

    def _disarm(self, worker: _Worker) -> None:
        if worker.waiter is not None:
            self._loop.remove_reader(worker.fd)
            worker.timer.cancel()

    @staticmethod
    def _settle(worker: _Worker, outcome: tuple[float, str] | BaseException) -> None:
        """Deliver the outcome to the item's caller, unless it stopped waiting (then it is dropped)."""
        waiter, worker.waiter, worker.timer = worker.waiter, None, None
        if waiter is None or waiter.done():
            return
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.exitcode is None:
            worker.process.kill()  # SIGKILL: a regex or C loop ignores anything gentler
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        self._kill(worker)
        self.replacements += 1
        if self._on_replace is not None:
            try:
                self._on_replace()
            except Exception:  # a metric's failure must not strand the item
                log.exception("the verifier pool's on_replace callback failed")
        if not self._closed:
            task = self._loop.create_task(self._respawn(worker.process))
            self._respawns.add(task)
            task.add_done_callback(self._respawns.discard)

    async def _respawn(self, dead: multiprocessing.process.BaseProcess) -> None:
        await self._loop.run_in_executor(None, _reap, [dead])
        while not self._closed:
            try:
                worker = await self._loop.run_in_executor(None, self._spawn)
            except Exception:
                log.exception("could not start a verifier process; trying again in %.0f s", _RETRY_S)
                await asyncio.sleep(_RETRY_S)
                continue
            if self._closed:
                self._kill(worker)
                await self._loop.run_in_executor(None, _reap, [worker.process])
                return
            self._workers.add(worker)
            self._idle.put_nowait(worker)
            return


def _reap(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Wait for killed processes to exit and free their handles (blocking: run off the event loop)."""
    for process in processes:
        process.join(5.0)
        if process.exitcode is not None:
            process.close()
