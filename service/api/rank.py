"""Best-of-N and pairwise comparison: one prompt, several responses, the prompt computed once."""

from __future__ import annotations

from fastapi import APIRouter, Request

from rewardserve.api.deps import RegistryDep, call_of, score_items
from rewardserve.api.limits import Route
from rewardserve.api.schemas import (
    ERROR_RESPONSES, BestOfNRequest, BestOfNResponse, CompareRequest, CompareResponse, Comparison, Usage, item,
)
from rewardserve.errors import RequestTooLarge
from rewardserve.transforms.fits import sigmoid

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
                                       call_of(body, [list(range(len(items)))]), body.timeout, body.transform)
    rewards = [s.reward for s in scored]  # shaped, when a transform applied: the ranking follows them
    ranking = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))  # ties: the earlier candidate first
    margin = rewards[ranking[0]] - rewards[ranking[1]] if len(ranking) > 1 else None
    raw = [s.raw_reward for s in scored] if scored[0].raw_reward is not None else None
    return BestOfNResponse(model=scorer.name, best_index=ranking[0], ranking=ranking[: body.top_k], rewards=rewards,
                           raw_rewards=raw, margin=margin, usage=Usage(tokens=sum(s.tokens for s in scored)))


@router.post("/v1/compare", response_model=CompareResponse, responses=ERROR_RESPONSES)
async def compare(body: CompareRequest, request: Request, registry: RegistryDep) -> CompareResponse:
    """Bradley-Terry preference between two responses to the same prompt, for one pair or a list."""
    pairs = body.pairs if body.pairs is not None else [body]
    items, groups = [], []
    for p in pairs:
        groups.append([len(items), len(items) + 1])
        # each response is the other's reference: a 'reference' baseline compares the two (computed once)
        items += [item(prompt=p.prompt, response=r, reference=o) for r, o in ((p.a, p.b), (p.b, p.a))]
    def locate(i: int, part: str | None) -> tuple[int | None, str]:
        side = "ab"[i % 2]
        return (i // 2, f"pairs[{i // 2}].{side}") if body.pairs is not None else (None, side)

    scorer, scored = await score_items(request, registry, body.model, items, locate, call_of(body, groups),
                                       body.timeout, body.transform)
    spec = body.transform or scorer.transform
    calibrated = spec is not None and spec.kind == "calibrated" and scorer.calibration.domain == "pairwise"
    results = []
    for k, p in enumerate(pairs):
        a, b = scored[2 * k], scored[2 * k + 1]
        ra, rb = (r.reward if r.raw_reward is None else r.raw_reward for r in (a, b))
        # the preference is the model's: raw rewards, through the pairwise calibration when it is asked for
        p_a = scorer.calibration(ra - rb) if calibrated else sigmoid(ra - rb)
        winner = "a" if p_a > 0.5 else "b" if p_a < 0.5 else "tie"
        tie = body.length_tie
        if tie is not None and winner != "tie":
            won, lost = (p.a, p.b) if winner == "a" else (p.b, p.a)
            if len(won) - len(lost) > tie.chars and abs(ra - rb) < tie.margin:
                winner = "tie"
        results.append(Comparison(reward_a=a.reward, reward_b=b.reward, raw_reward_a=a.raw_reward,
                                  raw_reward_b=b.raw_reward, p_a_better=p_a, winner=winner))
    return CompareResponse(model=scorer.name, results=results, usage=Usage(tokens=sum(s.tokens for s in scored)))
