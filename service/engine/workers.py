"""Devices and the models that run on them.

Each device has one worker, so model work never runs on the event loop and a device never runs two
batches at once, whichever models share it (`Devices`, one per process). A worker in this process
holds one batch at a time. A worker whose device lives in an engine process (engine/process.py) holds
two: the second waits in the engine's pipe while the first computes, so the engine goes from one batch
straight to the next instead of idling while this process hands the answer back and sends the next
batch. That second batch is collected only when the first is nearly done (`next_batch_due`), so it
still holds what arrived meanwhile, and a batch arriving behind it waits for one running batch, as it
would without it. Each model has its replicas, one per device it was loaded on (`ModelWorkers`): it
takes any free one of its devices for a batch, and measures and publishes that model's batches.

When a worker fails (engine/faults.py says what a failure means):
- a batch that runs past `batch_timeout_s` fails (503), and its worker gets a fresh thread (the stuck
  one is abandoned); so does a worker whose thread is gone. Until a probe batch has run on the new
  thread, /readyz says which worker is being replaced;
- a device that is lost (a CUDA error that poisons the context) is taken out of service: its
  batches fail at once, /readyz and /healthz answer 503 naming it (the process must restart);
- with engine processes (engine/process.py), a stuck batch's engine is killed, and an engine that
  died is started again: the probe waits until it has built its models anew.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from rewardserve.aio import next_set
from rewardserve.engine.faults import Outcome, is_device_lost, run_splitting
from rewardserve.engine.process import EngineDied
from rewardserve.engine.types import WorkItem
from rewardserve.errors import BackendError
from rewardserve.models.units import Unit
from rewardserve.monitoring.metrics import Metrics

log = logging.getLogger(__name__)
_PROBE = [Unit.single([0], (0,))]  # one token: what a fresh worker thread runs before it is trusted


# How long before the running batch's predicted end the next one is collected: enough to collect it,
# pickle it and send it while the engine still computes.
_LEAD_S = 0.004


class Worker:
    def __init__(self, device: str, depth: int = 1):
        self.device = device
        self.depth = depth  # batches it holds at once
        self.executor = self._thread()
        self.in_flight = 0
        self.due = 0.0  # when the batches in flight are predicted to be done (perf_counter)
        self.finished = asyncio.Event()  # set whenever one of its batches ends
        self.last_used = 0  # when it was last handed out (a counter): free workers go least recently used first
        self.replacing: str | None = None  # why its thread was replaced, until a probe batch has run on the new one
        self.lost: str | None = None  # why the device is out of service for good

    @property
    def busy(self) -> bool:
        return self.in_flight >= self.depth

    def _thread(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix=f"rs-{self.device}")

    def replace_thread(self, why: str) -> None:
        old, self.executor = self.executor, self._thread()
        old.shutdown(wait=False, cancel_futures=True)  # a stuck thread is abandoned, not joined
        self.replacing = why


class Devices:
    """The process's workers, handed out one batch at a time, first come first served."""

    def __init__(self):
        self.workers: dict[str, Worker] = {}
        self._waiting: deque[tuple[frozenset[str], asyncio.Future]] = deque()
        self._handed = 0

    def add(self, device: str, depth: int = 1) -> None:
        self.workers.setdefault(device, Worker(device, depth))

    def problems(self) -> tuple[list[str], list[str]]:
        """(devices lost for good, workers being replaced), each with the reason."""
        lost = [f"{w.device}: {w.lost}" for w in self.workers.values() if w.lost]
        replacing = [f"{w.device}: {w.replacing}" for w in self.workers.values() if w.replacing]
        return lost, replacing

    def _take(self, devices: frozenset[str]) -> Worker | None:
        # A worker being replaced takes nothing until its probe has run (it may be restarting its engine).
        free = [self.workers[d] for d in devices if not self.workers[d].busy and not self.workers[d].replacing]
        if not free:
            return None
        # an idle device before a busy one's second place; a lost device only when nothing else is
        w = min(free, key=lambda w: (w.lost is not None, w.in_flight, w.last_used))
        self._handed += 1
        w.in_flight += 1
        w.last_used = self._handed
        return w

    async def acquire(self, devices: frozenset[str]) -> Worker:
        """A free worker among `devices`, waiting in line behind earlier callers if none is."""
        if not self._waiting:
            w = self._take(devices)
            if w is not None:
                return w
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((devices, future))
        self._hand_out()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # handed over just as we were cancelled
                self.release(future.result())
            raise

    def release(self, worker: Worker) -> None:
        worker.in_flight -= 1
        worker.finished.set()
        self._hand_out()

    def wake(self) -> None:
        """A worker became usable again (its probe ran): give it to whoever waits."""
        self._hand_out()

    def _hand_out(self) -> None:
        """Give free workers to the oldest waiters that can use them."""
        for entry in list(self._waiting):
            devices, future = entry
            if future.done():
                self._waiting.remove(entry)
                continue
            free = self._take(devices)
            if free is not None:
                self._waiting.remove(entry)
                future.set_result(free)

    async def close(self) -> None:
        for w in self.workers.values():
            await asyncio.to_thread(w.executor.shutdown, wait=True, cancel_futures=True)


class ModelWorkers:
    """One model's replicas (a backend per device) on the shared workers."""

    def __init__(self, backends: list, devices: Devices, metrics: Metrics, model_name: str,
                 batch_timeout_s: float = 300.0):
        self.backends = {str(b.device): b for b in backends}
        for d, b in self.backends.items():
            devices.add(d, depth=2 if getattr(b, "engine", None) is not None else 1)
        self.mine = frozenset(self.backends)
        self.devices = devices
        self.metrics = metrics
        self.model = model_name
        self.batch_timeout_s = batch_timeout_s
        self._running: set[asyncio.Task] = set()
        self.tokens_per_second = 0.0  # EWMA of real tokens/s, for Retry-After estimates

    async def acquire(self) -> Worker:
        return await self.devices.acquire(self.mine)

    def release(self, worker: Worker) -> None:
        self.devices.release(worker)

    async def next_batch_due(self, worker: Worker) -> None:
        """Return when the next batch for `worker` should be collected: at once if nothing else runs on
        it, else shortly before the batches running there are predicted to end (or when one ends)."""
        while worker.in_flight > 1 and not worker.replacing:
            wait = worker.due - _LEAD_S - time.perf_counter()
            if wait <= 0:
                return
            if not await next_set(worker.finished, wait):
                return

    def dispatch(self, worker: Worker, batch: list[WorkItem]) -> None:
        """Run `batch` on `worker` in the background; the worker is released when it is done."""
        tokens = sum(it.tokens for it in batch)
        rate = self.tokens_per_second
        worker.due = max(worker.due, time.perf_counter()) + (tokens / rate if rate > 0 else 0.0)
        task = asyncio.get_running_loop().create_task(self._run(worker, batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, worker: Worker, batch: list[WorkItem]) -> None:
        start = time.perf_counter()
        for it in batch:
            it.started = start
        try:
            outcome = await self._compute(worker, [it.work for it in batch])
        except Exception as exc:  # the worker itself failed: this batch fails, and only this batch
            log.exception("batch of %d items of %s failed on %s", len(batch), self.model, worker.device)
            outcome = Outcome([exc] * len(batch))
        finally:
            self.release(worker)
        finished = time.perf_counter()
        for it in batch:
            it.finished = finished
        if outcome.real:  # a batch that waited in an engine's pipe counts the engine's time only
            self._publish(worker.device, batch, outcome, outcome.seconds or finished - start)
        for it, result in zip(batch, outcome.results):
            if it.future.done():
                continue
            if isinstance(result, BaseException):
                it.future.set_exception(result if isinstance(result, BackendError) else BackendError(
                    f"inference failed on {worker.device}: {type(result).__name__}: {result}"))
            elif all(math.isfinite(v) for row in result for v in row):
                it.future.set_result(result)
            else:
                it.future.set_exception(BackendError(f"model produced a non-finite score {result}"))

    async def _compute(self, worker: Worker, units: list[Unit]) -> Outcome:
        if worker.lost:
            raise BackendError(f"device {worker.device} is out of service ({worker.lost}); the server must restart")
        backend = self.backends[worker.device]
        loop = asyncio.get_running_loop()
        try:
            run = loop.run_in_executor(worker.executor, run_splitting, backend.score, units)
        except RuntimeError:  # its thread is gone (the executor was shut down): a fresh one, and again
            self._replace(worker, "its thread was gone")
            run = loop.run_in_executor(worker.executor, run_splitting, backend.score, units)
        try:
            outcome = await asyncio.wait_for(run, self.batch_timeout_s)
        except asyncio.TimeoutError:
            self._replace(worker, f"a batch ran past batch_timeout_s ({self.batch_timeout_s:g} s)", stuck=True)
            raise BackendError(f"the batch ran past batch_timeout_s ({self.batch_timeout_s:g} s) on {worker.device}; "
                               "its worker thread was replaced") from None
        if outcome.splits:
            self.metrics.oom_splits.labels(self.model, worker.device).inc(outcome.splits)
        died = next((r for r in outcome.results if isinstance(r, EngineDied)), None)
        if died is not None:
            self._replace(worker, str(died))
            return outcome
        lost = next((r for r in outcome.results if isinstance(r, BaseException) and is_device_lost(r)), None)
        if lost is not None:
            worker.lost = f"{type(lost).__name__}: {lost}"
            log.error("device %s is out of service: %s", worker.device, worker.lost)
        return outcome

    def _replace(self, worker: Worker, why: str, stuck: bool = False) -> None:
        engine = getattr(self.backends[worker.device], "engine", None)
        if engine is not None and stuck:
            engine.kill()  # a batch stuck in the engine process ends with it; the probe starts a new one
        if worker.replacing:  # the other batch in flight failed with the same engine: one probe is enough
            return
        log.error("replacing the worker thread of %s: %s", worker.device, why)
        worker.replace_thread(why)
        self.metrics.worker_replacements.labels(worker.device).inc()
        task = asyncio.get_running_loop().create_task(self._probe(worker))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _probe(self, worker: Worker) -> None:
        """A one-token batch on the fresh thread; the worker counts as replaced once it has run."""
        backend = self.backends[worker.device]
        loop = asyncio.get_running_loop()
        try:
            engine = getattr(backend, "engine", None)
            if engine is not None and not engine.alive:  # a fresh engine process, its models built again
                await loop.run_in_executor(worker.executor, engine.restart)
            await loop.run_in_executor(worker.executor, backend.score, _PROBE)
        except Exception as exc:
            worker.lost = f"the replaced worker's probe failed: {type(exc).__name__}: {exc}"
            log.error("device %s is out of service: %s", worker.device, worker.lost)
        worker.replacing = None
        self.devices.wake()

    def _publish(self, device: str, batch: list[WorkItem], out: Outcome, elapsed: float) -> None:
        m, name = self.metrics, self.model
        m.inference_duration.labels(name, device).observe(elapsed)
        m.device_busy.labels(name, device).inc(elapsed)
        if device.startswith("cuda"):
            m.device_memory.labels(name, device).set(torch.cuda.memory_allocated(device))
        m.batch_items.labels(name).observe(len(batch))
        m.batch_tokens.labels(name).observe(out.real)
        m.padding_fraction.labels(name).observe(1 - out.real / max(out.computed, 1))
        m.tokens.labels(name).inc(out.real)
        m.items.labels(name).inc(len(batch))
        if out.saved:
            m.prefix_saved_tokens.labels(name).inc(out.saved)
        rate = (out.real + out.saved) / max(elapsed, 1e-6)  # tokens served: what `due` and Retry-After count
        self.tokens_per_second = rate if self.tokens_per_second == 0 else 0.8 * self.tokens_per_second + 0.2 * rate

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
