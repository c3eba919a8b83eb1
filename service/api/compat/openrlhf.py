"""OpenRLHF's remote reward model: POST /get_reward.

OpenRLHF (`--reward.remote_url http://host:8000/get_reward`, openrlhf/utils/agent.py) posts
`{"query": [str], "prompts": [...], "labels": [...]}`, usually one sample per request, and reads
`rewards`, `scores` (its filtering signal, falling back to `rewards`) and `extra_logs`. Each query is
the whole prompt + response as the policy's tokenizer decoded it, chat template and special tokens
included, so it is tokenised without adding special tokens (a BOS it carries is never doubled).
`labels` are the ground truths (`reference`) of entries that check answers; those read the response
alone, the query's tail after its prompt.
With several URLs every server but the first receives empty lists: they answer empty lists.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import Field, StrictStr, model_validator

from rewardserve.api.deps import RegistryDep, score_items
from rewardserve.api.compat import ground_truth
from rewardserve.api.schemas import ERROR_RESPONSES, Closed
from rewardserve.api.limits import Route
from rewardserve.models.tokenize import Plain
from rewardserve.scorers.base import Call

router = APIRouter(tags=["compatible: OpenRLHF"], route_class=Route)


class GetRewardRequest(Closed):
    query: list[StrictStr] = Field(description="Prompt + response texts, chat template applied.")
    prompts: list[Any] | None = Field(None, description="The prompts alone (unused by reward models).")
    labels: list[Any] | None = Field(None, description="Ground truths, for entries that check answers; reward "
                                                       "models do not use them (as OpenRLHF's own server).")

    @model_validator(mode="after")
    def _aligned(self) -> "GetRewardRequest":
        for name in ("prompts", "labels"):
            values = getattr(self, name)
            if values and len(values) != len(self.query):
                raise ValueError(f"{name} has {len(values)} entries for {len(self.query)} queries")
        return self


class GetRewardResponse(Closed):
    rewards: list[float]
    scores: list[float] = Field(description="The same as rewards, as OpenRLHF's own server answers.")
    extra_logs: dict[str, list[float]] = Field(description="Ensembles: each member's rewards and the disagreement; "
                                                           "with the entry's transform, raw_reward.")


@router.post("/get_reward", response_model=GetRewardResponse, responses=ERROR_RESPONSES)
async def get_reward(body: GetRewardRequest, request: Request, registry: RegistryDep,
                     model: str | None = Query(None, description="Registry entry (default: the default one).")
                     ) -> GetRewardResponse:
    """Rewards for OpenRLHF's queries, in order."""
    if not body.query:
        registry.get(model)  # still a 404 for a wrong model name
        return GetRewardResponse(rewards=[], scores=[], extra_logs={})
    scorer = registry.get(model)
    items = []
    for i, q in enumerate(body.query):
        ref = ground_truth(body.labels[i], scorer, i, f"labels[{i}]") if body.labels else None
        prompt = body.prompts[i] if body.prompts else None
        # checkers read the response alone: the query's tail after its prompt, when the prompt is its head
        response = q[len(prompt):] if isinstance(prompt, str) and q.startswith(prompt) else None
        items.append(Plain(text=q, add_special_tokens=False, response=response, reference=ref))
    _, results = await score_items(request, registry, model, items, lambda i, part: (i, f"query[{i}]"), Call())
    rewards = [r.reward for r in results]
    logs: dict[str, list[float]] = {}
    if results[0].members is not None:
        logs = {name: [r.members[name] for r in results] for name in results[0].members}
        logs["disagreement"] = [r.disagreement for r in results]
    if results[0].raw_reward is not None:  # the entry shapes its rewards: the model's own beside them
        logs["raw_reward"] = [r.raw_reward for r in results]
    return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs=logs)

