"""Graceful shutdown: on SIGTERM (or Ctrl-C) the server drains before it stops.

At once, /readyz answers 503 (a load balancer stops sending traffic) and new scoring requests get
503 `draining`; the requests in flight, with their queued items, run to completion for up to
`drain_timeout_s`; then uvicorn's own shutdown closes the connections, the models are released and
the cache's pending writes reach Redis; the process exits 0. A second signal stops it at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_timeout_s: float):
        super().__init__(config)
        self.state = state  # the app's: registry and requests in flight
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # unlike uvicorn's own, this does not re-raise the signal after shutdown: a drain exits 0
        registry = self.state.registry
        if registry.draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self.force_exit or sig == signal.SIGINT and registry.draining
            return
        registry.draining = True  # from the signal handler: a flag the loop reads, nothing more
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain(sig)))

    async def _drain(self, sig: int) -> None:
        log.info("%s: draining %d request(s) in flight (up to %g s)", signal.Signals(sig).name, self.state.inflight,
                 self.drain_timeout_s)
        deadline = time.monotonic() + self.drain_timeout_s
        while self.state.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.inflight:
            log.warning("drain timeout: %d request(s) still in flight", self.state.inflight)
        self.should_exit = True
