"""create_app(settings, registry): the FastAPI application. No model work happens at import time.

The registry's models load in a background task started by the lifespan, so /healthz answers at
once and /readyz turns 200 when every entry is loaded and warmed up (what a Kubernetes probe wants).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rewardserve import __version__
from rewardserve.api import admin, errors, health, rank, score, steps
from rewardserve.api.admission import Admission
from rewardserve.api.compat import openrlhf, slime, tei, vllm
from rewardserve.api.security import Auth, KeyRing
from rewardserve.config import RegistryConfig, ServerSettings, quick
from rewardserve.engine.registry import Registry
from rewardserve.monitoring.metrics import Metrics

log = logging.getLogger(__name__)

# Which server answered (host:pid), on every response: behind a load balancer, Ray Serve's proxy or a
# Kubernetes Service, the way to tell replicas apart.
INSTANCE_HEADER = (b"x-rewardserve-instance", f"{socket.gethostname()}:{os.getpid()}".encode())


class RequestMetrics:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the routes); it
    also counts the requests in flight, which a drain waits for."""

    def __init__(self, app, metrics: Metrics, paths: set[str], state):
        self.app = app
        self.metrics = metrics
        self.paths = paths  # label by known route paths only: bounded cardinality
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500
        self.state.inflight += 1
        self.metrics.in_flight.inc()
        scope.setdefault("state", {})["arrived_draining"] = self.state.registry.draining

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), INSTANCE_HEADER]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.inflight -= 1
            self.metrics.in_flight.dec()
            path = scope["path"] if scope["path"] in self.paths else "other"
            model = errors.model_label(scope)  # served names only: a route sets it once the name is known
            self.metrics.requests.labels(model, path, str(status)).inc()
            self.metrics.request_duration.labels(model, path).observe(time.perf_counter() - start)


def create_app(settings: ServerSettings | None = None, registry: RegistryConfig | None = None) -> FastAPI:
    """The app serving `registry` (default: the embedded model, or what RS_* variables say)."""
    if settings is None or registry is None:
        default_settings, default_registry = quick()
        settings, registry = settings or default_settings, registry or default_registry
    registry.check(settings)
    metrics = Metrics()
    scorers = Registry(settings, registry, metrics)
    keys = None
    if settings.api_keys_file:
        keys = KeyRing(settings.api_keys_file, settings.quota_requests_per_s, settings.quota_tokens_per_s, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(scorers.start(), name="rewardserve-load")
        loading.add_done_callback(lambda t: t.cancelled() or t.exception())  # error kept in registry.load_error
        app.state.loading = loading
        if keys is not None:
            keys.start()
        try:
            yield
        finally:
            loading.cancel()
            if keys is not None:
                await keys.stop()
            await scorers.stop()

    app = FastAPI(
        title="rewardserve", version=__version__, lifespan=lifespan,
        description="Fast, exact reward-model scoring for RLHF training jobs and best-of-N inference.",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = scorers
    app.state.inflight = 0  # HTTP requests being answered (a drain waits for them)
    errors.install(app)
    routers = (score.router, steps.router, rank.router, health.router, admin.router, openrlhf.router, vllm.router,
               slime.router, tei.router)
    for router in routers:
        app.include_router(router)
    paths = {r.path for router in routers for r in router.routes}
    app.add_middleware(Admission, registry=scorers, max_concurrent=settings.max_concurrent_requests, metrics=metrics)
    if keys is not None:  # outside admission (a caller without a key costs nothing), inside the metrics
        public = {p.strip() for p in settings.public_paths.split(",") if p.strip()}
        app.add_middleware(Auth, keys=keys, public=public, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics, paths=paths, state=app.state)
    return app
