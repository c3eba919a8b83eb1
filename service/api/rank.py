"""Best-of-N and pairwise comparison: one prompt, several responses, the prompt computed once."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request

from rewardserve.api.deps import ReadyEngine, check_model, unless_disconnected
from rewardserve.api.schemas import (
    ERROR_RESPONSES, BestOfNRequest, BestOfNResponse, CompareRequest, CompareResponse, Comparison, Item, Options,
    Usage,
)
from rewardserve.engine.engine import Engine, ScoredItem
from rewardserve.engine.types import Lane, Ticket
from rewardserve.errors import RequestTooLarge

router = APIRouter(tags=["ranking"])


async def score_grouped(engine: Engine, request: Request, opts: Options, items: list[Item],
                        groups: list[list[int]]) -> list[ScoredItem]:
    """Score items whose groups share a prompt; the route-level plumbing every scoring endpoint shares."""
    check_model(engine, opts.model)
    limit = engine.settings.max_items_per_request
    if len(items) > limit:
        raise RequestTooLarge(f"request expands to {len(items)} items, more than max_items_per_request ({limit})")
    truncation = opts.truncation or engine.settings.default_truncation
    return await unless_disconnected(request, engine.score_items(
        items, truncation=truncation, lane=Lane[opts.priority], ticket=Ticket(), use_cache=opts.cache,
        groups=groups,
    ))


@router.post("/v1/best_of_n", response_model=BestOfNResponse, responses=ERROR_RESPONSES)
async def best_of_n(body: BestOfNRequest, request: Request, engine: ReadyEngine) -> BestOfNResponse:
    """Rank N candidate responses to one prompt; the prompt's tokens are computed once."""
    limit = engine.settings.max_candidates
    if len(body.candidates) > limit:
        raise RequestTooLarge(f"candidates holds {len(body.candidates)} responses, more than max_candidates ({limit})")
    if body.prompt is not None:
        items = [Item.model_construct(prompt=body.prompt, response=c, messages=None, text=None, input_ids=None,
                                      add_special_tokens=None, group=None) for c in body.candidates]
    else:
        chat = [m.model_dump() for m in body.messages]
        items = [Item.model_construct(prompt=None, response=None, text=None, input_ids=None, add_special_tokens=None,
                                      group=None, messages=chat + [{"role": "assistant", "content": c}])
                 for c in body.candidates]
    scored = await score_grouped(engine, request, body, items, [list(range(len(items)))])
    rewards = [s.reward for s in scored]
    ranking = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))  # ties: the earlier candidate first
    margin = rewards[ranking[0]] - rewards[ranking[1]] if len(ranking) > 1 else None
    return BestOfNResponse(model=engine.name, best_index=ranking[0], ranking=ranking[: body.top_k], rewards=rewards,
                           margin=margin, usage=Usage(tokens=sum(s.tokens for s in scored)))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@router.post("/v1/compare", response_model=CompareResponse, responses=ERROR_RESPONSES)
async def compare(body: CompareRequest, request: Request, engine: ReadyEngine) -> CompareResponse:
    """Bradley-Terry preference between two responses to the same prompt, for one pair or a list."""
    pairs = body.pairs if body.pairs is not None else [body]
    items, groups = [], []
    for p in pairs:
        groups.append([len(items), len(items) + 1])
        items += [Item.model_construct(prompt=p.prompt, response=r, messages=None, text=None, input_ids=None,
                                       add_special_tokens=None, group=None) for r in (p.a, p.b)]
    scored = await score_grouped(engine, request, body, items, groups)
    results = []
    for k, p in enumerate(pairs):
        ra, rb = scored[2 * k].reward, scored[2 * k + 1].reward
        winner = "a" if ra > rb else "b" if rb > ra else "tie"
        tie = body.length_tie
        if tie is not None and winner != "tie":
            won, lost = (p.a, p.b) if winner == "a" else (p.b, p.a)
            if len(won) - len(lost) > tie.chars and abs(ra - rb) < tie.margin:
                winner = "tie"
        results.append(Comparison(reward_a=ra, reward_b=rb, p_a_better=_sigmoid(ra - rb), winner=winner))
    return CompareResponse(model=engine.name, results=results, usage=Usage(tokens=sum(s.tokens for s in scored)))
