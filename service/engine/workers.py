"""One worker per device: each owns a model replica and a single thread, so model work never runs on
the event loop and a device never runs two batches at once."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from rewardserve.engine.types import WorkItem
from rewardserve.errors import BackendError, bug
from rewardserve.models.units import Shared, unit_rows
from rewardserve.monitoring.metrics import Metrics

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, backend):  # an HFBackend or a PackedBackend
        self.backend = backend
        self.device = str(backend.device)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rs-{self.device}")

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class WorkerPool:
    def __init__(self, backends: list, metrics: Metrics, model_name: str):
        self.workers = [Worker(b) for b in backends]
        self.metrics = metrics
        self.model = model_name
        self._free: asyncio.Queue[Worker] = asyncio.Queue()
        for w in self.workers:
            self._free.put_nowait(w)
        self._running: set[asyncio.Task] = set()
        self.tokens_per_second = 0.0  # EWMA of real tokens/s, for Retry-After estimates

    async def acquire(self) -> Worker:
        return await self._free.get()

    def release(self, worker: Worker) -> None:
        self._free.put_nowait(worker)

    def dispatch(self, worker: Worker, batch: list[WorkItem]) -> None:
        """Run `batch` on `worker` in the background; the worker is released when it is done."""
        task = asyncio.get_running_loop().create_task(self._run(worker, batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, worker: Worker, batch: list[WorkItem]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            out = await loop.run_in_executor(worker.executor, worker.backend.score, [it.work for it in batch])
        except Exception as exc:  # one failed batch fails its own items only
            log.exception("batch of %d items failed on %s", len(batch), worker.device)
            err = BackendError(f"inference failed on {worker.device}: {type(exc).__name__}: {exc}")
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(err)
            return
        finally:
            self.release(worker)
        elapsed = time.perf_counter() - start
        m, name = self.metrics, self.model
        m.inference_duration.labels(name, worker.device).observe(elapsed)
        m.device_busy.labels(name, worker.device).inc(elapsed)
        if worker.device.startswith("cuda"):
            m.device_memory.labels(name, worker.device).set(torch.cuda.memory_allocated(worker.device))
        m.batch_items.labels(name).observe(len(batch))
        m.batch_tokens.labels(name).observe(out.real_tokens)
        m.padding_fraction.labels(name).observe(1 - out.real_tokens / max(out.computed_positions, 1))
        m.tokens.labels(name).inc(out.real_tokens)
        m.items.labels(name).inc(len(batch))
        rate = out.real_tokens / max(elapsed, 1e-6)
        self.tokens_per_second = rate if self.tokens_per_second == 0 else 0.8 * self.tokens_per_second + 0.2 * rate
        rows = out.scores.tolist()
        start = 0
        for it in batch:
            n = unit_rows(it.work)
            mine, start = rows[start : start + n], start + n
            if it.future.done():
                continue
            if all(math.isfinite(v) for row in mine for v in row):
                it.future.set_result(mine if isinstance(it.work, Shared) else mine[0])
            else:
                it.future.set_exception(BackendError(f"model produced a non-finite score {mine}"))
        if start != len(rows):
            raise bug(f"backend returned {len(rows)} rows for {start} expected.")

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        for w in self.workers:
            await asyncio.to_thread(w.close)
