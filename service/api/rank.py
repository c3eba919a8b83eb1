"""Best-of-N and pairwise comparison: one prompt, several responses, the prompt computed once."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request

from rewardserve.api.deps import RegistryDep, call_of, score_items
from rewardserve.api.limits import Route
from rewardserve.api.schemas import (
    ERROR_RESPONSES, BestOfNRequest, BestOfNResponse, CompareRequest, CompareResponse, Comparison, Usage, item,
)
from rewardserve.errors import RequestTooLarge

router = APIRouter(tags=["ranking"], route_class=Route)


@router.post("/v1/best_of_n", response_model=BestOfNResponse, responses=ERROR_RESPONSES)
async def best_of_n(body: BestOfNRequest, request: Request, registry: RegistryDep) -> BestOfNResponse:
    """Rank N candidate responses to one prompt; the prompt's tokens are computed once."""
    limit = registry.settings.max_candidates
    if len(body.candidates) > limit:
        raise RequestTooLarge(f"candidates holds {len(body.candidates)} responses, more than max_candidates ({limit})")
    if body.prompt is not None:
        items = [item(prompt=body.prompt, response=c) for c in body.candidates]
    else:
        chat = [m.model_dump() for m in body.messages]
        items = [item(messages=chat + [{"role": "assistant", "content": c}]) for c in body.candidates]
    scorer, scored = await score_items(request, registry, body.model, items, lambda i, part: (i, f"candidates[{i}]"),
                                       call_of(body, [list(range(len(items)))]),
                                       body.timeout)
    rewards = [s.reward for s in scored]
    ranking = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))  # ties: the earlier candidate first
    margin = rewards[ranking[0]] - rewards[ranking[1]] if len(ranking) > 1 else None
    return BestOfNResponse(model=scorer.name, best_index=ranking[0], ranking=ranking[: body.top_k], rewards=rewards,
                           margin=margin, usage=Usage(tokens=sum(s.tokens for s in scored)))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@router.post("/v1/compare", response_model=CompareResponse, responses=ERROR_RESPONSES)
async def compare(body: CompareRequest, request: Request, registry: RegistryDep) -> CompareResponse:
    """Bradley-Terry preference between two responses to the same prompt, for one pair or a list."""
    pairs = body.pairs if body.pairs is not None else [body]
    items, groups = [], []
    for p in pairs:
        groups.append([len(items), len(items) + 1])
        items += [item(prompt=p.prompt, response=r) for r in (p.a, p.b)]
    def locate(i: int, part: str | None) -> tuple[int | None, str]:
        side = "ab"[i % 2]
        return (i // 2, f"pairs[{i // 2}].{side}") if body.pairs is not None else (None, side)

    scorer, scored = await score_items(request, registry, body.model, items, locate, call_of(body, groups),
                                       body.timeout)
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
    return CompareResponse(model=scorer.name, results=results, usage=Usage(tokens=sum(s.tokens for s in scored)))
