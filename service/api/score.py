"""POST /v1/score: rewards for a list of items, in input order."""

from __future__ import annotations

import time

import orjson

from fastapi import APIRouter, Request, Response

from rewardserve.api.deps import RegistryDep, call_of, item_field, score_items
from rewardserve.api.schemas import ERROR_RESPONSES, Item, ScoreRequest, ScoreResponse
from rewardserve.api.limits import Route

router = APIRouter(tags=["scoring"], route_class=Route)


def detect_groups(items: list[Item]) -> list[list[int]]:
    """Items with the same `group`, the same prompt, or the same chat before the last turn share a prompt."""
    by_key: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        if it.group is not None:
            key = ("group", it.group)
        elif it.prompt is not None:
            key = ("prompt", it.prompt)
        elif it.messages is not None and len(it.messages) > 1:
            key = ("chat", tuple((m.role, m.content) for m in it.messages[:-1]))
        else:
            continue
        by_key.setdefault(key, []).append(i)
    return [idx for idx in by_key.values() if len(idx) > 1]


@router.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, responses=ERROR_RESPONSES)
async def score(body: ScoreRequest, request: Request, registry: RegistryDep) -> Response:
    """Score items with a registry entry: a reward model (its output at each item's last token) or an
    ensemble (its members' rewards aggregated)."""
    start = time.perf_counter()
    scorer, results = await score_items(request, registry, body.model, body.items, item_field("items"),
                                        call_of(body, detect_groups(body.items)), body.timeout, body.transform,
                                        body.advantages)
    out = {"model": scorer.name, "rewards": [r.reward for r in results], "items": [r.fields() for r in results],
           "usage": {"tokens": sum(r.tokens for r in results)}}
    # serialised here, by orjson: FastAPI would validate the response model again, then encode it
    return Response(orjson.dumps(out), media_type="application/json", headers={
        "x-total-time": f"{(time.perf_counter() - start) * 1000:.3f}"})
