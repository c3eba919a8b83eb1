"""Best-of-N and pairwise comparison: one prompt, several responses, the prompt computed once."""

from __future__ import annotations

from fastapi import APIRouter, Request

from rewardserve.api.deps import RegistryDep, call_of, run_scoring, score_items
from rewardserve.api.limits import Route
from rewardserve.api.schemas import (
    ERROR_RESPONSES, BestOfNRequest, BestOfNResponse, CompareRequest, CompareResponse, Comparison, Usage, item,
)
from rewardserve.errors import InvalidInput, RequestTooLarge
from rewardserve.scorers.judge import JudgeScorer
from rewardserve.transforms.fits import sigmoid

router = APIRouter(tags=["ranking"], route_class=Route)


@router.post("/v1/best_of_n", response_model=BestOfNResponse, responses=ERROR_RESPONSES)
async def best_of_n(body: BestOfNRequest, request: Request, registry: RegistryDep) -> BestOfNResponse:
    """Rank N candidate responses to one prompt; the prompt's tokens are computed once."""
    limit = registry.settings.max_candidates
    if len(body.candidates) > limit:
        raise RequestTooLarge(f"candidates holds {len(body.candidates)} responses, more than max_candidates ({limit})")
    if body.prompt is not None:
        items = [item(prompt=body.prompt, response=c, reference=body.reference) for c in body.candidates]
    else:
        chat = [m.model_dump() for m in body.messages]
        items = [item(messages=chat + [{"role": "assistant", "content": c}], reference=body.reference)
                 for c in body.candidates]
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
    """Bradley-Terry preference between two responses to the same prompt, for one pair or a list; a judge
    with pairwise judging is asked which is better, in both orders."""
    pairs = body.pairs if body.pairs is not None else [body]
    groups = [[2 * k, 2 * k + 1] for k in range(len(pairs))]
    target = registry.get(body.model)
    if isinstance(target, JudgeScorer) and target.pairwise:
        return await _judge_pairs(body, pairs, groups, request, registry)
    items = []
    for p in pairs:
        # without a reference answer each response is the other's: a 'reference' baseline compares the two
        # (computed once); a scorer that checks against ground truth needs the real one
        items += [item(prompt=p.prompt, response=r,
                       reference=p.reference if p.reference is not None or target.uses_reference else o)
                  for r, o in ((p.a, p.b), (p.b, p.a))]
    locate = _locate(body)
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


def _locate(body: CompareRequest):
    def locate(i: int, part: str | None) -> tuple[int | None, str]:
        side = "ab"[i % 2]
        return (i // 2, f"pairs[{i // 2}].{side}") if body.pairs is not None else (None, side)

    return locate


async def _judge_pairs(body: CompareRequest, pairs, groups, request: Request, registry) -> CompareResponse:
    """A pairwise judge: its mean log-odds over both orders that a is better, split as +-half into the two
    rewards (so that p_a_better = sigmoid(reward_a - reward_b), as for reward models)."""
    if body.transform is not None or body.length_tie is not None or body.heads is not None:
        field = "transform" if body.transform is not None else "length_tie" if body.length_tie else "heads"
        raise InvalidInput(f"{field}: a pairwise judge gives a preference, not rewards to shape or weigh",
                           field=field)
    call = call_of(body, groups)
    asked = [(p.prompt, p.a, p.b) for p in pairs]
    scorer, judged = await run_scoring(request, registry, body.model, 2 * len(pairs), lambda i, part: (
        (i, f"pairs[{i}]") if body.pairs is not None else (None, "prompt")), call, body.timeout,
        lambda scorer: scorer.compare(asked, call))
    results = []
    for first, swapped, r in judged:
        p_a = sigmoid(r.reward)
        winner = "a" if p_a > 0.5 else "b" if p_a < 0.5 else "tie"
        results.append(Comparison(reward_a=r.reward / 2, reward_b=-r.reward / 2, p_a_better=p_a, winner=winner,
                                  position_log_odds=[first, swapped]))
    return CompareResponse(model=scorer.name, results=results, usage=Usage(tokens=sum(r.tokens for _, _, r in judged)))
