"""Liveness, readiness, model listing and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from rewardserve.api.deps import EngineDep, ReadyEngine
from rewardserve.api.schemas import ModelCard, ModelList
from rewardserve.monitoring.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up and its event loop answers (even while a batch runs)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(engine: EngineDep) -> JSONResponse:
    """200 once the model is loaded and warmed up, 503 before (and if loading failed)."""
    if engine.ready:
        return JSONResponse({"status": "ready", "model": engine.name})
    if engine.load_error is not None:
        message = f"model failed to load: {type(engine.load_error).__name__}: {engine.load_error}"
        return JSONResponse({"error": {"type": "load_failed", "message": message}}, status_code=503)
    return JSONResponse({"error": {"type": "not_ready", "message": "model is loading"}}, status_code=503)


@router.get("/v1/models", response_model=ModelList)
async def models(engine: ReadyEngine) -> ModelList:
    m = engine.model
    card = ModelCard(
        id=m.name, source=m.source, architecture=m.architecture, num_labels=m.num_labels, labels=m.labels,
        max_length=m.max_length, dtype=str(m.dtype).removeprefix("torch."), devices=m.devices,
        backend=m.backend, attention=m.attention, fingerprint=engine.fingerprint,
    )
    return ModelList(data=[card])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
