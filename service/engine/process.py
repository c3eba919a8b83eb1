"""Engine processes: one per device, holding the replicas of every model on that device.

Why a process: a model's forward is hundreds of small torch calls, and each returns to Python, which
needs the GIL. In the server's own process the event loop holds the GIL while it parses HTTP and
tokenises, so every one of those returns waits for it: a batch that takes 12 ms alone took 25 ms
under HTTP load, and 700 ms next to a thread that never lets go of the GIL. In a process of its own
a device's forward never waits for the front end (vLLM splits its API server from its engine core
for the same reason).

This process keeps the tokenizers, the queues and the caches; an engine process gets a `Plan` per
model (models/loading.py), builds the replica itself, and answers `score(units)` calls over a pipe
with the rows as a float32 array. A device's worker thread (engine/workers.py) makes the calls, one
batch at a time, and waits on the pipe without the GIL. Exceptions come back as themselves (an
out-of-memory error still splits its batch). An engine that dies or is killed (its batch ran past
`batch_timeout_s`) is started again with the same plans, and its models are loaded anew.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

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
                if threads:
                    chooser.record(threads, out.real_tokens, time.perf_counter() - start)
                answer = (out.scores.numpy(), out.computed_positions, out.real_tokens)
            reply = ("ok", answer)
        except BaseException as exc:  # the caller decides what a failure means (engine/faults.py)
            if is_oom(exc):
                free_device_memory()  # before the caller retries the batch in halves
            reply = ("error", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # an exception that does not pickle: its text still does
            conn.send(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({exc})")))


class Engine:
    """The server's handle on one device's engine process: `load(plan)` gives a backend whose
    `score(units)` runs there. Calls are made from worker threads, one at a time."""

    def __init__(self, device: torch.device, tuning: Tuning, start_method: str | None = None):
        self.device = device
        self.tuning = tuning
        self.start_method = start_method or ("forkserver" if device.type == "cpu" else "spawn")
        self._ctx = multiprocessing.get_context(self.start_method)
        self._lock = threading.Lock()
        self._plans: dict[int, object] = {}
        self._process = None
        self._conn: Connection | None = None
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
        self._process, self._conn = process, parent

    @property
    def alive(self) -> bool:
        return self._conn is not None and self._process is not None and self._process.is_alive()

    def load(self, plan) -> "RemoteBackend":
        key = len(self._plans)
        info = self._call("load", key, plan)
        self._plans[key] = plan
        return RemoteBackend(self, key, info)

    def score(self, key: int, units: list[Unit]) -> BatchOutput:
        scores, computed, real = self._call("score", key, units)
        return BatchOutput(torch.from_numpy(scores), computed, real)

    def _call(self, op: str, key: int, payload):
        with self._lock:
            if self._conn is None:
                raise EngineDied(f"the engine process for {self.device} is not running")
            try:
                self._conn.send((op, key, payload))
                status, answer = self._conn.recv()
            except (EOFError, OSError):
                # The pipe breaks before the OS reaps the process: dead now, whatever is_alive says yet.
                self.kill()
                if self._process is not None:
                    self._process.join(1)
                code = self._process.exitcode if self._process is not None else None
                raise EngineDied(f"the engine process for {self.device} died (exit code {code})") from None
        if status == "error":
            raise answer
        return answer

    def restart(self) -> None:
        """Kill the engine (a stuck batch with it) and start a fresh one that builds the same models."""
        self.kill()
        if self._process is not None:
            self._process.join(10)
        self.restarts += 1
        self.start()
        for key, plan in sorted(self._plans.items()):
            self._call("load", key, plan)

    def kill(self) -> None:
        """Stop the process now (not waiting for it: restart and close reap it); a call waiting on it
        gets EngineDied."""
        process, conn = self._process, self._conn
        self._conn = None
        if process is not None and process.is_alive():
            process.kill()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Ask the engine to exit, then make sure it has."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(None)
                except OSError:
                    pass
        if self._process is not None:
            self._process.join(10)
        self.kill()
        if self._process is not None:
            self._process.join(5)


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

