"""POST /v1/score: rewards for a list of items, in input order."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response

from rewardserve.api.deps import ReadyEngine
from rewardserve.api.rank import score_grouped
from rewardserve.api.schemas import ERROR_RESPONSES, Item, ItemResult, ScoreRequest, ScoreResponse, Usage

router = APIRouter(tags=["scoring"])


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


@router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
async def score(body: ScoreRequest, request: Request, response: Response, engine: ReadyEngine) -> ScoreResponse:
    """Score items with the reward model. Each item's reward is the model's output at its last token."""
    start = time.perf_counter()
    scored = await score_grouped(engine, request, body, body.items, detect_groups(body.items))
    multi = engine.model.num_labels > 1
    items = [
        ItemResult(reward=s.reward, scores=s.scores if multi else None, tokens=s.tokens, truncated=s.truncated,
                   cached=s.cached)
        for s in scored
    ]
    response.headers["x-total-time"] = f"{(time.perf_counter() - start) * 1000:.3f}"
    return ScoreResponse(
        model=engine.name, rewards=[s.reward for s in scored], items=items,
        usage=Usage(tokens=sum(s.tokens for s in scored)),
    )
