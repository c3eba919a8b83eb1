"""POST /v1/score_steps: a reward for every step of a solution, and their aggregate."""

from __future__ import annotations

from fastapi import APIRouter, Request

from rewardserve.api.deps import RegistryDep, run_scoring
from rewardserve.api.limits import Route
from rewardserve.api.schemas import ERROR_RESPONSES, StepResult, StepsRequest, StepsResponse, Usage
from rewardserve.engine.types import Lane
from rewardserve.scorers.base import Call
from rewardserve.scorers.process import Solution, score_steps

router = APIRouter(tags=["scoring"], route_class=Route)


@router.post("/v1/score_steps", response_model=StepsResponse, response_model_exclude_none=True,
             responses=ERROR_RESPONSES)
async def steps(body: StepsRequest, request: Request, registry: RegistryDep) -> StepsResponse:
    """Step rewards of one solution (prompt or messages, and steps) or of a `solutions` list: a process
    reward model reads each step at its tag in one pass; any other entry scores every prefix of the steps."""
    single = body.solutions is None
    given = [body] if single else body.solutions
    solutions = [Solution(steps=list(s.steps), prompt=s.prompt,
                          messages=None if s.messages is None else [m.model_dump() for m in s.messages])
                 for s in given]

    def locate(i: int, part: str | None) -> tuple[int | None, str | None]:
        where = part or "steps"
        return (None, where) if single else (i, f"solutions[{i}].{where}")

    call = Call(lane=Lane[body.priority], use_cache=body.cache, truncation=body.truncation)
    n_items = sum(len(s.steps) for s in solutions)
    scorer, results = await run_scoring(request, registry, body.model, n_items, locate, call, body.timeout,
                                        lambda scorer: score_steps(scorer, solutions, call, body.separator,
                                                                   body.aggregate))
    out = [StepResult(reward=r.reward, step_rewards=r.step_rewards, tokens=r.tokens, truncated=r.truncated,
                      cached=r.cached) for r in results]
    return StepsResponse(model=scorer.name, aggregate=body.aggregate, reward=out[0].reward if single else None,
                         step_rewards=out[0].step_rewards if single else None, results=out,
                         usage=Usage(tokens=sum(r.tokens for r in results)))
