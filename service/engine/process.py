"""Engine processes: one per device, holding the replicas of every model on that device.

Why a process: a model's forward is hundreds of small torch calls, and each returns to Python, which
needs the GIL. In the server's own process the event loop holds the GIL while it parses HTTP and
tokenises, so every one of those returns waits for it: a batch that takes 12 ms alone took 25 ms
under HTTP load, and 700 ms next to a thread that never lets go of the GIL. In a process of its own
a device's forward never waits for the front end (vLLM splits its API server from its engine core
for the same reason).

This process keeps the tokenizers, the queues and the caches; an engine process gets a `Plan` per
model (models/loading.py), builds the replica itself, and answers `score(units)` calls over a pipe
with the rows as a float32 array. A device's worker threads (engine/workers.py) make the calls; a call
is sent at once and its answer comes back through a reader thread that owns the pipe's receiving end,
so a second batch can wait in the pipe while the engine computes the first and the engine never idles
between them. The engine answers in the order it was asked. Exceptions come back as themselves (an
out-of-memory error still splits its batch). An engine that dies or is killed (its batch ran past
`batch_timeout_s`) is started again with the same plans, and its models are loaded anew.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import torch

from rewardserve.engine.faults import free_device_memory, is_oom
from rewardserve.models.hf_backend import BatchOutput
from rewardserve.models.units import Unit
from rewardserve.runtime import prepare_forkserver

log = logging.getLogger(__name__)

_START_S = 600.0  # an engine must report ready within this (importing torch on a slow disk, spawn start)


class EngineDied(RuntimeError):
    """The engine process of a device is gone (killed, crashed, or out of host memory)."""


@dataclass(frozen=True)
class Tuning:
    """What an engine process sets up before it builds anything (the server's CPU settings)."""

    threads: int | None
    keep_memory: bool
    attention_kernel: bool
    log_level: str


class ThreadChooser:
    """Picks a CPU engine's torch thread count per batch by measurement, between all cores and all but
    one. Why: the front end (HTTP, tokenisation, cache) shares the host's cores with the engine. Under
    many small requests it keeps a core busy, and an OpenMP team on every core then waits at each
    barrier for the thread the OS descheduled (measured on the 2-core VM: 1 thread beat 2 by 20% on
    uncached one-item requests); under few large ones the front end idles and every core should compute
    (2 threads ran the 41M model 1.95x faster than 1). Each batch's tokens/s is folded into its count's
    moving average; the better count runs, and now and then a batch tries the other: every `explore`-th
    batch at first, twice as rarely each time the other loses (up to every `explore_max`-th), so that a
    settled choice costs little (a try of the slower count is a slow batch). Scores do not depend on the
    thread count (tests/models/test_batch_invariance.py)."""

    def __init__(self, cores: int, explore: int = 8, explore_max: int = 256):
        self.choices = sorted({max(1, cores - 1), max(1, cores)})
        self.rates: dict[int, float] = {}
        self.explore, self.explore_min, self.explore_max = explore, explore, explore_max
        self.countdown = explore

    def best(self) -> int:
        return max(self.choices, key=lambda c: self.rates.get(c, 0.0))

    def pick(self) -> int:
        untried = [c for c in self.choices if c not in self.rates]
        if untried:
            return untried[0]
        self.countdown -= 1
        if len(self.choices) > 1 and self.countdown <= 0:
            return next(c for c in self.choices if c != self.best())
        return self.best()

    def record(self, threads: int, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-6)
        if self.countdown <= 0:  # that was a try of the other count
            leader = self.best()
            self.explore = self.explore_min if rate > self.rates[leader] else min(2 * self.explore, self.explore_max)
            self.countdown = self.explore
        old = self.rates.get(threads)
        self.rates[threads] = rate if old is None else 0.7 * old + 0.3 * rate


def _engine_main(conn: Connection, device: str, tuning: Tuning) -> None:
    """An engine: build replicas on `device` and score batches for them until the pipe closes."""
    logging.basicConfig(level=tuning.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chooser = ThreadChooser(os.cpu_count() or 1) if device.startswith("cpu") and not tuning.threads else None
    if tuning.threads:
        torch.set_num_threads(tuning.threads)
    if tuning.keep_memory:
        from rewardserve.runtime import keep_freed_memory

        keep_freed_memory()
    from rewardserve.models.loading import build_replicas

    models: dict[int, object] = {}
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        op, key, payload = request
        try:
            if op == "load":
                [backend] = build_replicas(payload, [torch.device(device)], tuning.attention_kernel)
                models[key] = backend
                answer = {"vocab_size": backend.vocab_size, "attention": backend.attention,
                          "shares_prefix": backend.shares_prefix}
            else:
                threads = chooser.pick() if chooser else None
                if threads:
                    torch.set_num_threads(threads)
                start = time.perf_counter()
                out = models[key].score(payload)
                seconds = time.perf_counter() - start
                if threads:
                    chooser.record(threads, out.real_tokens + out.saved_tokens, seconds)
                answer = (out.scores.numpy(), out.computed_positions, out.real_tokens, seconds, out.saved_tokens)
            reply = ("ok", answer)
        except BaseException as exc:  # the caller decides what a failure means (engine/faults.py)
            if is_oom(exc):
                free_device_memory()  # before the caller retries the batch in halves
            reply = ("error", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # an exception that does not pickle: its text still does
            conn.send(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({exc})")))


class _Link:
    """One started engine's pipe: calls go out in order under a lock, and a reader thread hands each
    answer to the oldest waiting call. When the pipe breaks, every waiting call (and every later one)
    gets EngineDied."""

    def __init__(self, name: str, process, conn: Connection):
        self.process, self.conn = process, conn
        self.lock = threading.Lock()
        self.waiting: deque[Future] = deque()
        self.died: EngineDied | None = None
        self._engine_name = name
        self.reader = threading.Thread(target=self._read, name=f"rs-engine-reader-{name}", daemon=True)
        self.reader.start()

    def submit(self, message) -> Future:
        data = ForkingPickler.dumps(message)  # what Connection.send does; a payload that cannot pickle fails
        future: Future = Future()            # here, before it takes a place in line for an answer
        with self.lock:
            if self.died is not None:
                raise self.died
            self.waiting.append(future)
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):  # the engine is gone; the reader fails this call with the others
                pass
        return future

    def _read(self) -> None:
        while True:
            try:
                status, answer = self.conn.recv()
            except BaseException:  # EOF, a broken or closed pipe: the engine is gone
                break
            with self.lock:
                future = self.waiting.popleft()
            if status == "error":
                future.set_exception(answer)
            else:
                future.set_result(answer)
        # The pipe breaks before the OS reaps the process: dead now, whatever is_alive says yet.
        if self.process.is_alive():
            self.process.kill()
        self.process.join(1)
        died = EngineDied(f"the engine process for {self._engine_name} died (exit code {self.process.exitcode})")
        with self.lock:
            self.died = died
            waiting, self.waiting = list(self.waiting), deque()
        for future in waiting:
            future.set_exception(died)
        self.conn.close()

    @property
    def alive(self) -> bool:
        return self.died is None and self.process.is_alive()

    def kill(self) -> None:
        """Kill the process; the reader then sees the pipe break and fails the waiting calls."""
        if self.process.is_alive():
            self.process.kill()


class Engine:
    """The server's handle on one device's engine process: `load(plan)` gives a backend whose
    `score(units)` runs there. Calls may come from several threads at once; they run in turn."""

    def __init__(self, device: torch.device, tuning: Tuning, start_method: str | None = None):
        self.device = device
        self.tuning = tuning
        self.start_method = start_method or ("forkserver" if device.type == "cpu" else "spawn")
        self._ctx = multiprocessing.get_context(self.start_method)
        self._plans: dict[int, object] = {}
        self._link: _Link | None = None
        self.pid: int | None = None
        self.restarts = 0

    def start(self) -> None:
        if self.start_method == "forkserver":
            prepare_forkserver(self._ctx)
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_engine_main, args=(child, str(self.device), self.tuning),
                                    name=f"rewardserve-engine-{self.device}", daemon=True)
        process.start()
        child.close()  # only the engine holds its end: its death closes the pipe
        if not parent.poll(_START_S):
            process.kill()
            raise EngineDied(f"the engine process for {self.device} did not start within {_START_S:.0f} s")
        try:
            status, self.pid = parent.recv()
        except (EOFError, OSError):
            raise EngineDied(f"the engine process for {self.device} exited as it started "
                             f"(exit code {process.exitcode})") from None
        self._link = _Link(str(self.device), process, parent)

    @property
    def alive(self) -> bool:
        return self._link is not None and self._link.alive

    def load(self, plan) -> "RemoteBackend":
        key = len(self._plans)
        info = self._call("load", key, plan)
        self._plans[key] = plan
        return RemoteBackend(self, key, info)

    def score(self, key: int, units: list[Unit]) -> BatchOutput:
        scores, computed, real, seconds, saved = self._call("score", key, units)
        return BatchOutput(torch.from_numpy(scores), computed, real, seconds, saved)

    def _call(self, op: str, key: int, payload):
        link = self._link
        if link is None:
            raise EngineDied(f"the engine process for {self.device} is not running")
        return link.submit((op, key, payload)).result()

    def restart(self) -> None:
        """Kill the engine (a stuck batch with it) and start a fresh one that builds the same models."""
        self.kill()
        if self._link is not None:
            self._link.reader.join(10)
        self.restarts += 1
        self.start()
        for key, plan in sorted(self._plans.items()):
            self._call("load", key, plan)

    def kill(self) -> None:
        """Stop the process now (not waiting for it: restart and close reap it); the calls waiting on it
        get EngineDied."""
        if self._link is not None:
            self._link.kill()

    def close(self) -> None:
        """Ask the engine to exit, then make sure it has."""
        link = self._link
        if link is None:
            return
        with link.lock:
            if link.died is None:
                try:
                    link.conn.send(None)
                except (OSError, ValueError):
                    pass
        link.process.join(10)
        link.kill()
        link.reader.join(5)


class RemoteBackend:
    """A model's replica in an engine process, scored as if it were here."""

    def __init__(self, engine: Engine, key: int, info: dict):
        self.engine = engine
        self.key = key
        self.device = engine.device
        self.vocab_size = info["vocab_size"]
        self.attention = info["attention"]
        self.shares_prefix = info["shares_prefix"]

    def score(self, units: list[Unit]) -> BatchOutput:
        return self.engine.score(self.key, units)

