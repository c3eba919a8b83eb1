"""Operator endpoints: the drift report and its reference."""

from __future__ import annotations

from fastapi import APIRouter

from rewardserve.api.deps import RegistryDep
from rewardserve.api.limits import Route
from rewardserve.errors import InvalidInput, ServiceError
from rewardserve.monitoring.monitor import RewardMonitor


class MonitoringOff(ServiceError):
    status = 404
    type = "monitoring_off"


def _monitors(registry) -> dict[str, RewardMonitor]:
    registry.get(None)  # 503 until loaded
    if not registry.settings.monitoring:
        raise MonitoringOff("monitoring is off on this server (--monitoring)")
    return {name: s.monitor for name, s in registry.scorers.items()}


router = APIRouter(prefix="/admin", tags=["operations"], route_class=Route)


@router.get("/drift")
async def drift_report(registry: RegistryDep) -> dict:
    """Per entry and head: PSI, KS and standardized mean shift of the current reward window against the
    reference, with the rolling distribution and the reward-hacking signals. Computed fresh for this call."""
    return {"models": {name: await m.refresh() for name, m in _monitors(registry).items()}}


@router.post("/drift/reference")
async def freeze_reference(registry: RegistryDep, model: str | None = None) -> dict:
    """Freeze an entry's current window as its drift reference (e.g. at the start of a training run);
    `?model=NAME`, default: the default entry."""
    monitors = _monitors(registry)
    name = registry.get(model).name
    try:
        n = monitors[name].freeze_reference()
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return {"model": name, "reference_n": n}
