"""Peer-compatible endpoints, one file per peer: each translates the peer's request onto the same
scorers (exact scores, cross-request batching, cache, monitoring, registry entries) and answers in
the peer's shapes, defaults and error conventions.

    openrlhf.py  POST /get_reward                    (OpenRLHF --reward.remote_url)
    vllm.py      POST /classify, /pooling, /score, /rerank, /v1/rerank   (verl's reward loop)
    slime.py     POST /v1/reward                      (slime --rm-type remote_rm --rm-url)
    tei.py       POST /predict                        (text-embeddings-inference)

Peers whose requests cannot name a model take the registry entry from `?model=NAME` (default: the
default entry). Here: what they share.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from rewardserve.api.errors import describe
from rewardserve.api.limits import Route
from rewardserve.errors import InvalidInput, ServiceError
from rewardserve.scorers.base import Result, Scorer
from rewardserve.transforms.fits import sigmoid


def ground_truth(value: Any, scorer: Scorer, index: int | None, where: str) -> str | None:
    """A peer's label as an item's `reference`: text, or a number's decimal text. Entries that do not
    check answers ignore labels of any shape, as the peers' own servers do."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if scorer.uses_reference:
        raise InvalidInput(f"a ground truth is text or a number, not {type(value).__name__}", index=index,
                           field=where)
    return None


def activated(values: list[float]) -> list[float]:
    """What classifier servers apply by default: sigmoid for one output, softmax for several."""
    if len(values) == 1:
        return [sigmoid(values[0])]
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def outputs(scorer: Scorer, result: Result) -> tuple[list[str], list[float]]:
    """(labels, values) of one result: every head of a multi-head model, else the reward alone."""
    if result.scores is not None:
        return list(result.scores), list(result.scores.values())
    return scorer.labels[:1], [result.reward]


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# (request, status, the native error's fields) -> (status, body) in a peer's own shape
Render = Callable[[Request, int, dict], tuple[int, dict]]


def route_class(render: Render) -> type[APIRoute]:
    """The route class of a router whose errors leave in a peer's shape (validation errors included:
    FastAPI raises them inside the route handler)."""

    class PeerRoute(Route):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def handle(request: Request):
                try:
                    return await handler(request)
                except (ServiceError, RequestValidationError) as exc:
                    status, err, headers = describe(request, exc)
                    status, body = render(request, status, err)
                    return JSONResponse(body, status_code=status, headers=headers)

            return handle

    return PeerRoute
