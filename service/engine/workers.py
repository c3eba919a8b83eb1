"""Devices and the models that run on them.

Each device has one worker: a single thread, so model work never runs on the event loop and a device
never runs two batches at once, whichever models share it (`Devices`, one per process). Each model
has its replicas, one per device it was loaded on (`ModelWorkers`): it takes any free one of its
devices for a batch, and measures and publishes that model's batches.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from rewardserve.engine.types import WorkItem
from rewardserve.errors import BackendError, bug
from rewardserve.monitoring.metrics import Metrics

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, device: str):
        self.device = device
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rs-{device}")
        self.busy = False
        self.last_used = 0  # when it was last handed out (a counter): free workers go least recently used first


class Devices:
    """The process's workers, handed out one batch at a time, first come first served."""

    def __init__(self):
        self.workers: dict[str, Worker] = {}
        self._waiting: deque[tuple[frozenset[str], asyncio.Future]] = deque()
        self._handed = 0

    def add(self, device: str) -> None:
        self.workers.setdefault(device, Worker(device))

    def _take(self, devices: frozenset[str]) -> Worker | None:
        free = [self.workers[d] for d in devices if not self.workers[d].busy]
        if not free:
            return None
        w = min(free, key=lambda w: w.last_used)
        self._handed += 1
        w.busy, w.last_used = True, self._handed
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
        worker.busy = False
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

    def __init__(self, backends: list, devices: Devices, metrics: Metrics, model_name: str):
        self.backends = {str(b.device): b for b in backends}
        for d in self.backends:
            devices.add(d)
        self.mine = frozenset(self.backends)
        self.devices = devices
        self.metrics = metrics
        self.model = model_name
        self._running: set[asyncio.Task] = set()
        self.tokens_per_second = 0.0  # EWMA of real tokens/s, for Retry-After estimates

    async def acquire(self) -> Worker:
        return await self.devices.acquire(self.mine)

    def release(self, worker: Worker) -> None:
        self.devices.release(worker)

    def dispatch(self, worker: Worker, batch: list[WorkItem]) -> None:
        """Run `batch` on `worker` in the background; the worker is released when it is done."""
        task = asyncio.get_running_loop().create_task(self._run(worker, batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, worker: Worker, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        backend = self.backends[worker.device]
        start = time.perf_counter()
        for it in batch:
            it.started = start
        try:
            out = await loop.run_in_executor(worker.executor, backend.score, [it.work for it in batch])
        except Exception as exc:  # one failed batch fails its own items only
            log.exception("batch of %d items of %s failed on %s", len(batch), self.model, worker.device)
            err = BackendError(f"inference failed on {worker.device}: {type(exc).__name__}: {exc}")
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(err)
            return
        finally:
            self.release(worker)
        finished = time.perf_counter()
        elapsed = finished - start
        for it in batch:
            it.finished = finished
        self._publish(worker.device, batch, out, elapsed)
        rows = out.scores.tolist()
        start = 0
        for it in batch:
            n = it.work.rows
            mine, start = rows[start: start + n], start + n
            if it.future.done():
                continue
            if all(math.isfinite(v) for row in mine for v in row):
                it.future.set_result(mine)
            else:
                it.future.set_exception(BackendError(f"model produced a non-finite score {mine}"))
        if start != len(rows):
            raise bug(f"backend returned {len(rows)} rows for {start} expected.")

    def _publish(self, device: str, batch: list[WorkItem], out, elapsed: float) -> None:
        m, name = self.metrics, self.model
        m.inference_duration.labels(name, device).observe(elapsed)
        m.device_busy.labels(name, device).inc(elapsed)
        if device.startswith("cuda"):
            m.device_memory.labels(name, device).set(torch.cuda.memory_allocated(device))
        m.batch_items.labels(name).observe(len(batch))
        m.batch_tokens.labels(name).observe(out.real_tokens)
        m.padding_fraction.labels(name).observe(1 - out.real_tokens / max(out.computed_positions, 1))
        m.tokens.labels(name).inc(out.real_tokens)
        m.items.labels(name).inc(len(batch))
        rate = out.real_tokens / max(elapsed, 1e-6)
        self.tokens_per_second = rate if self.tokens_per_second == 0 else 0.8 * self.tokens_per_second + 0.2 * rate

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
