"""Operator endpoints: the drift report and its reference."""

from __future__ import annotations

from fastapi import APIRouter

from rewardserve.api.deps import ReadyEngine
from rewardserve.errors import InvalidInput, ServiceError


class MonitoringOff(ServiceError):
    status = 404
    type = "monitoring_off"


def _monitor(engine):
    if engine.monitor is None:
        raise MonitoringOff("monitoring is off on this server (--monitoring)")
    return engine.monitor

router = APIRouter(prefix="/admin", tags=["operations"])


@router.get("/drift")
async def drift_report(engine: ReadyEngine) -> dict:
    """PSI, KS and standardized mean shift of the current reward window against the reference, per head,
    with the rolling distribution and the reward-hacking signals. Computed fresh for this call."""
    report = await _monitor(engine).refresh()
    return {"models": {engine.name: report}}


@router.post("/drift/reference")
async def freeze_reference(engine: ReadyEngine) -> dict:
    """Freeze the current window as the drift reference (e.g. at the start of a training run)."""
    try:
        n = _monitor(engine).freeze_reference()
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return {"model": engine.name, "reference_n": n}
