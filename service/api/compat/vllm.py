"""vLLM's pooling API: POST /classify, /pooling (task classify), /score and /rerank (and /v1/rerank).

Shapes follow vLLM's own (vllm/entrypoints/pooling/*/protocol.py and serving.py). verl's reward
loop (verl/experimental/reward_loop/reward_loop.py) posts `{"model", "input": str,
"use_activation": false}` per sample and reads `data[-1].probs[-1]`: the raw reward.

- `use_activation` (default true) applies vLLM's activation: sigmoid for one output, softmax for
  several; false returns the raw outputs. The legacy `activation` and `softmax` keys (older vLLM,
  and older verl, sends `activation: false`) are honoured when `use_activation` is absent.
- `truncate_prompt_tokens`: null follows the entry's truncation policy; -1 cuts to the model's
  max_length; k cuts to k tokens, on `truncation_side` (default right). A cut from the left keeps
  the BOS, as everywhere in rewardserve.
- `priority` <= 0 is the interactive lane, > 0 the bulk one.
- /score and /rerank score each (query, document) as a prompt/response item.
- vLLM options rewardserve does not implement are accepted at their defaults only, and unknown
  fields are refused: a 400 names them rather than ignoring them.
- `/v1/score` stays rewardserve's own endpoint; vLLM's scoring is at /score.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator

from rewardserve.api.compat import activated, outputs, request_id, route_class
from rewardserve.api.deps import RegistryDep, score_items
from rewardserve.api.schemas import Closed, Message, item
from rewardserve.engine.types import Lane
from rewardserve.errors import InvalidInput
from rewardserve.scorers.base import Call, Result

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          413: "RequestTooLargeError", 429: "TooManyRequestsError", 503: "ServiceUnavailableError",
          504: "TimeoutError"}


_LIMITS = ("body_too_large", "text_too_long")  # rewardserve's own limits stay 413s


def _render(request: Request, status: int, err: dict) -> tuple[int, dict]:
    """vLLM's error body: {"error": {"message", "type", "param", "code"}}; bad input is a 400."""
    status = 400 if status == 422 or (status == 413 and err["type"] not in _LIMITS) else status
    body = {"message": err["message"], "type": _TYPES.get(status, "InternalServerError"),
            "param": err.get("field"), "code": status}
    return status, {"error": body}


router = APIRouter(tags=["compatible: vLLM"], route_class=route_class(_render))


class _Request(Closed):
    model: StrictStr | None = None
    user: StrictStr | None = None
    request_id: StrictStr | None = Field(None, description="Used as the response id's suffix.")
    priority: StrictInt = Field(0, description="<= 0: interactive lane; > 0: bulk lane.")
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    use_activation: StrictBool | None = None
    activation: StrictBool | None = Field(None, description="Legacy name of use_activation.")
    softmax: StrictBool | None = Field(None, description="Legacy name of use_activation.")
    # vLLM options rewardserve does not implement: accepted at their defaults only
    padding: None = None
    mm_processor_kwargs: None = None
    cache_salt: None = None

    @property
    def use(self) -> bool:
        for value in (self.use_activation, self.activation, self.softmax):
            if value is not None:
                return value
        return True

    def call(self, max_length: int | None, groups=(), timing=None) -> Call:
        """The scorer's view: lane, and how far to cut (-1: max_length; k: k tokens)."""
        k = self.truncate_prompt_tokens
        truncation, limit = None, None
        if k == 0:
            raise ValueError("truncate_prompt_tokens is -1 (the model's max_length) or at least 1")
        if k is not None:
            if max_length is not None and k > max_length:
                raise ValueError(f"truncate_prompt_tokens ({k}) is greater than the model's max_length "
                                 f"({max_length})")
            truncation, limit = self.truncation_side or "right", None if k == -1 else k
        return Call(lane=Lane.interactive if self.priority <= 0 else Lane.bulk, truncation=truncation,
                    max_tokens=limit, groups=groups, timing=timing)


class ClassifyRequest(_Request):
    """vLLM's completion form (`input`) or chat form (`messages`)."""

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: StrictBool | None = Field(None, description="Default: true for input, false for messages.")
    add_generation_prompt: Literal[False] = False
    continue_final_message: Literal[False] = False
    chat_template: None = None
    chat_template_kwargs: None = None

    @model_validator(mode="after")
    def _one_form(self) -> "ClassifyRequest":
        if (self.input is None) == (self.messages is None):
            raise ValueError("send input or messages")
        return self

    def as_items(self) -> list:
        if self.messages is not None:
            return [item(messages=[m.model_dump() for m in self.messages], add_special_tokens=bool(
                self.add_special_tokens))]
        raw = self.input
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise ValueError("You must pass at least one prompt")
        add = self.add_special_tokens is not False
        return [item(input_ids=x) if isinstance(x, list) else item(text=x, add_special_tokens=add) for x in raw]


class PoolingRequest(ClassifyRequest):
    task: Literal["classify"] | None = Field(None, description="Only classify: rewardserve serves classifiers.")
    encoding_format: Literal["float"] = "float"
    dimensions: None = None


def _max_length(registry, model: str | None) -> int | None:
    scorer = registry.get(model)
    return getattr(getattr(scorer, "model", None), "max_length", None)


async def _classify(request: Request, registry, body: _Request) -> tuple[Any, list[Result]]:
    try:
        items, call = body.as_items(), body.call(_max_length(registry, body.model))
    except ValueError as exc:
        raise _bad(str(exc)) from None
    return await score_items(request, registry, body.model, items, lambda i, part: (i, "input"), call)


def _bad(message: str, field: str | None = None) -> InvalidInput:
    return InvalidInput(message, field=field)


def _listing(kind: str, body: _Request, scorer, data: list[dict], results: list[Result]) -> dict:
    """vLLM's list response around `data`, with the request's id when it gave one."""
    n = sum(r.tokens for r in results)
    return {"id": f"{kind}-{body.request_id}" if body.request_id else request_id(kind), "object": "list",
            "created": int(time.time()), "model": scorer.name, "data": data,
            "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": None}}


def _probs(body: _Request, values: list[float]) -> list[float]:
    return activated(values) if body.use else values


@router.post("/classify")
async def classify(body: ClassifyRequest, request: Request, registry: RegistryDep) -> dict:
    """vLLM's /classify: `input` (str, [str], [int] or [[int]]) or `messages`."""
    scorer, results = await _classify(request, registry, body)
    data = []
    for i, r in enumerate(results):
        labels, values = outputs(scorer, r)
        probs = _probs(body, values)
        data.append({"index": i, "label": labels[max(range(len(probs)), key=probs.__getitem__)], "probs": probs,
                     "num_classes": len(probs)})
    return _listing("classify", body, scorer, data, results)


@router.post("/pooling")
async def pooling(body: PoolingRequest, request: Request, registry: RegistryDep) -> dict:
    """vLLM's /pooling with task classify (the only task of a reward model)."""
    scorer, results = await _classify(request, registry, body)
    data = [{"index": i, "object": "pooling", "data": _probs(body, outputs(scorer, r)[1])}
            for i, r in enumerate(results)]
    return _listing("pooling", body, scorer, data, results)


_Side = StrictStr | list[StrictStr]
_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class ScoreRequest(_Request):
    queries: _Side | None = None
    documents: _Side | None = None
    items: _Side | None = None
    data_1: _Side | None = None
    data_2: _Side | None = None
    text_1: _Side | None = None
    text_2: _Side | None = None
    max_tokens_per_query: Literal[0] = 0
    max_tokens_per_doc: Literal[0] = 0
    instruction: None = None
    chat_template_kwargs: None = None

    @model_validator(mode="after")
    def _one_pair_form(self) -> "ScoreRequest":
        complete = [pair for pair in _PAIRS if all(getattr(self, f) is not None for f in pair)]
        used = {f for pair in _PAIRS for f in pair if getattr(self, f) is not None}
        if len(complete) != 1 or used != set(complete[0]):
            raise ValueError("send one pair of fields: queries + documents, queries + items, data_1 + data_2 or "
                             "text_1 + text_2")
        return self

    def pairs(self) -> tuple[list[tuple[str, str]], list[list[int]]]:
        """(query, document) pairs, 1:1, 1:N or N:N, and the groups that share a query."""
        first, second = (getattr(self, f) for f in next(p for p in _PAIRS if all(getattr(self, f) is not None
                                                                                    for f in p)))
        left = [first] if isinstance(first, str) else first
        right = [second] if isinstance(second, str) else second
        if not left or not right:
            raise ValueError("both sides need at least one text")
        if len(left) == 1:
            return [(left[0], d) for d in right], [list(range(len(right)))]
        if len(left) != len(right):
            raise ValueError("Input lengths must be either 1:1, 1:N or N:N")
        return list(zip(left, right)), []


async def _pair_scores(request: Request, registry, body: _Request, pairs, groups) -> tuple[Any, list[Result]]:
    items = [item(prompt=q, response=d) for q, d in pairs]
    try:
        call = body.call(_max_length(registry, body.model), groups)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    return await score_items(request, registry, body.model, items, lambda i, part: (i, "documents"), call)


@router.post("/score")
async def score(body: ScoreRequest, request: Request, registry: RegistryDep) -> dict:
    """vLLM's /score: each (query, document) pair scored as a prompt and its response."""
    try:
        pairs, groups = body.pairs()
    except ValueError as exc:
        raise _bad(str(exc)) from None
    scorer, results = await _pair_scores(request, registry, body, pairs, groups)
    data = [{"index": i, "object": "score", "score": _probs(body, [r.reward])[0]} for i, r in enumerate(results)]
    return _listing("score", body, scorer, data, results)


class RerankRequest(_Request):
    query: StrictStr
    documents: _Side
    top_n: StrictInt = Field(0, ge=0, description="Keep the best n (0: all).")
    max_tokens_per_query: Literal[0] = 0
    max_tokens_per_doc: Literal[0] = 0
    instruction: None = None
    chat_template_kwargs: None = None


@router.post("/rerank")
@router.post("/v1/rerank")
async def rerank(body: RerankRequest, request: Request, registry: RegistryDep) -> dict:
    """vLLM's /rerank: documents sorted by their reward as responses to the query."""
    docs = [body.documents] if isinstance(body.documents, str) else body.documents
    if not docs:
        raise _bad("documents needs at least one text", "documents")
    scorer, results = await _pair_scores(request, registry, body, [(body.query, d) for d in docs],
                                         [list(range(len(docs)))])
    scores = [_probs(body, [r.reward])[0] for r in results]
    order = sorted(range(len(docs)), key=lambda i: -scores[i])
    if 0 < body.top_n < len(order):
        order = order[: body.top_n]
    n = sum(r.tokens for r in results)
    return {"id": request_id("rerank"), "model": scorer.name, "usage": {"prompt_tokens": n, "total_tokens": n},
            "results": [{"index": i, "document": {"text": docs[i]}, "relevance_score": scores[i]} for i in order]}
