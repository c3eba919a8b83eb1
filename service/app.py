"""create_app(settings): the FastAPI application. No model work happens at import time.

The model loads in a background task started by the lifespan, so /healthz answers at once and
/readyz turns 200 when the model is loaded and warmed up (what a Kubernetes probe wants).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rewardserve import __version__
from rewardserve.api import admin, errors, health, rank, score
from rewardserve.config import Settings
from rewardserve.engine.engine import Engine
from rewardserve.monitoring.metrics import Metrics

log = logging.getLogger(__name__)


class RequestMetrics:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the routes)."""

    def __init__(self, app, metrics: Metrics, model: str, paths: set[str]):
        self.app = app
        self.metrics = metrics
        self.model = model
        self.paths = paths  # label by known route paths only: bounded cardinality

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.requests.labels(self.model, path, str(status)).inc()
            self.metrics.request_duration.labels(self.model, path).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    engine = Engine(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(engine.start(), name="rewardserve-load")
        loading.add_done_callback(lambda t: t.cancelled() or t.exception())  # error kept in engine.load_error
        app.state.loading = loading
        try:
            yield
        finally:
            loading.cancel()
            await engine.stop()

    app = FastAPI(
        title="rewardserve", version=__version__, lifespan=lifespan,
        description="Fast, exact reward-model scoring for RLHF training jobs and best-of-N inference.",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    errors.install(app)
    for router in (score.router, rank.router, health.router, admin.router):
        app.include_router(router)
    paths = {r.path for router in (score.router, rank.router, health.router, admin.router) for r in router.routes}
    app.add_middleware(RequestMetrics, metrics=metrics, model=settings.model_name, paths=paths)
    return app
