"""slime's remote reward model: POST /v1/reward.

slime (`--rm-type remote_rm --rm-url http://host:8000/v1/reward --reward-key reward`,
slime/rollout/rm_hub/__init__.py) posts `{"prompt", "response", "label"}` once per sample and keeps
the whole JSON answer, taking the field `--reward-key` names: `reward`. The prompt is either the
chat so far (a list of messages: the response is appended as the assistant's turn and the entry's
chat template renders it) or a string, which slime has already rendered with the policy's template
(`--apply-chat-template`): the text scored is then the prompt followed by the response, as sent.
`label` is the ground truth (`reference`) for entries that check answers (verifiers, composites with
one), which read the response alone; reward models do not use it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import Field, StrictStr

from rewardserve.api.deps import RegistryDep, score_items
from rewardserve.api.compat import ground_truth
from rewardserve.api.schemas import ERROR_RESPONSES, Closed, ItemResult, Message, item
from rewardserve.api.limits import Route
from rewardserve.models.tokenize import Plain
from rewardserve.scorers.base import Call

router = APIRouter(tags=["compatible: slime"], route_class=Route)


class RewardRequest(Closed):
    prompt: StrictStr | list[Message] = Field(description="The rendered prompt text, or the chat so far.")
    response: StrictStr
    label: Any = Field(None, description="Ground truth, for entries that check answers.")


@router.post("/v1/reward", response_model=ItemResult, response_model_exclude_none=True, responses=ERROR_RESPONSES)
async def reward(body: RewardRequest, request: Request, registry: RegistryDep,
                 model: str | None = Query(None, description="Registry entry (default: the default one).")
                 ) -> ItemResult:
    """One sample's reward, with the item's other fields beside it."""
    ref = ground_truth(body.label, registry.get(model), None, "label")
    if isinstance(body.prompt, str):  # checkers read the response alone; models the whole text
        one = Plain(text=body.prompt + body.response, response=body.response, reference=ref)
    else:
        one = item(messages=[m.model_dump() for m in body.prompt] + [{"role": "assistant", "content": body.response}],
                   reference=ref)
    _, [result] = await score_items(request, registry, model, [one], lambda i, part: (None, "response"), Call())
    return ItemResult(**result.fields())
