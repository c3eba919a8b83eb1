"""Liveness, readiness, the registry's entries and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from rewardserve.api.deps import RegistryDep
from rewardserve.api.schemas import ModelCard, ModelList
from rewardserve.api.limits import Route
from rewardserve.monitoring.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"], route_class=Route)


@router.get("/healthz")
async def healthz(registry: RegistryDep) -> JSONResponse:
    """The process is up and its event loop answers (even while a batch runs); 503 when a device is lost
    for good (a CUDA error that poisons the context), which only a restart mends."""
    lost, _ = registry.devices.problems()
    if lost:
        return JSONResponse({"error": {"type": "device_lost", "message": "; ".join(lost)}}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(registry: RegistryDep) -> JSONResponse:
    """200 once every entry is loaded and warmed up, 503 before (and if loading failed, and while the
    server drains on its way out)."""
    if registry.draining:
        return JSONResponse({"error": {"type": "draining", "message": "shutting down"}}, status_code=503)
    lost, replacing = registry.devices.problems()
    if lost or replacing:
        kind = "device_lost" if lost else "worker_replaced"
        message = "; ".join([f"lost {p}" for p in lost] + [f"replacing the worker of {p}" for p in replacing])
        return JSONResponse({"error": {"type": kind, "message": message}}, status_code=503)
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
