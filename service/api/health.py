"""Liveness, readiness, the registry's entries and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from rewardserve.api.deps import RegistryDep
from rewardserve.api.schemas import ModelCard, ModelList
from rewardserve.monitoring.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up and its event loop answers (even while a batch runs)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(registry: RegistryDep) -> JSONResponse:
    """200 once every entry is loaded and warmed up, 503 before (and if loading failed)."""
    if registry.ready:
        return JSONResponse({"status": "ready", "model": registry.default, "models": registry.names})
    if registry.failure is not None:
        message = f"model failed to load: {registry.failure}"
        return JSONResponse({"error": {"type": "load_failed", "message": message}}, status_code=503)
    return JSONResponse({"error": {"type": "not_ready", "message": "models are loading"}}, status_code=503)


@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
async def models(registry: RegistryDep) -> ModelList:
    """Every entry of the registry with its kind (reward_model, ensemble), the default one first."""
    registry.get(None)  # 503 until loaded
    names = [registry.default] + [n for n in registry.names if n != registry.default]
    return ModelList(data=[ModelCard(**registry.scorers[n].card()) for n in names])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
