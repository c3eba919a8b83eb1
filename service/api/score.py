"""POST /v1/score: rewards for a list of items, in input order."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response

from service.api.deps import ReadyEngine, check_model, unless_disconnected
from service.api.schemas import ERROR_RESPONSES, ItemResult, ScoreRequest, ScoreResponse, Usage
from service.engine.types import Lane, Ticket
from service.errors import RequestTooLarge

router = APIRouter(tags=["scoring"])


@router.post("/v1/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
async def score(body: ScoreRequest, request: Request, response: Response, engine: ReadyEngine) -> ScoreResponse:
    """Score items with the reward model. Each item's reward is the model's output at its last token."""
    start = time.perf_counter()
    check_model(engine, body.model)
    limit = engine.settings.max_items_per_request
    if len(body.items) > limit:
        raise RequestTooLarge(f"items holds {len(body.items)} items, more than max_items_per_request ({limit})")
    truncation = body.truncation or engine.settings.default_truncation
    scored = await unless_disconnected(
        request,
        engine.score_items(body.items, truncation=truncation, lane=Lane[body.priority], ticket=Ticket(),
                           use_cache=body.cache),
    )
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
