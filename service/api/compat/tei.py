"""text-embeddings-inference's sequence classification: POST /predict.

Shapes follow TEI's router (router/src/http/types.rs, server.rs; core/src/infer.rs):
- `inputs`: "text" (one), ["text"] (one), ["prompt", "response"] (a pair, scored as a prompt and
  its response), or a batch [["a"], ["q", "d"], ...] answered as a list of lists in input order;
- `raw_scores` (default false): sigmoid for one output, softmax for several; true: the raw outputs;
- each answer lists every label with its score, best first;
- `truncate` (default: the entry's truncation policy; TEI's own default depends on its
  --auto-truncate flag), `truncation_direction` Left / Right (default Right);
- errors `{"error", "error_type"}`: Validation 422, Empty 400, Overloaded 429,
  Backend 424, Unhealthy 503;
- timing headers, integer milliseconds: x-total-time, x-compute-time, x-tokenization-time,
  x-queue-time (the request's slowest wait), x-inference-time (its slowest batch), and
  x-compute-tokens, x-compute-characters.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BeforeValidator, Field, StrictBool, StrictStr

from rewardserve.api.compat import activated, outputs, route_class
from rewardserve.api.deps import RegistryDep, score_items
from rewardserve.api.schemas import Closed, item
from rewardserve.engine.types import Timing
from rewardserve.errors import InvalidInput, RequestTooLarge
from rewardserve.scorers.base import Call


def _render(request: Request, status: int, err: dict) -> tuple[int, dict]:
    kind = err["type"]
    if kind == "empty_input":
        return 400, {"error": err["message"], "error_type": "Empty"}
    if status == 429:
        return 429, {"error": err["message"], "error_type": "Overloaded"}
    if kind == "backend_error":
        return 424, {"error": err["message"], "error_type": "Backend"}
    if status == 503:
        return 503, {"error": err["message"], "error_type": "Unhealthy"}
    return 422, {"error": err["message"], "error_type": "Validation"}


router = APIRouter(tags=["compatible: text-embeddings-inference"], route_class=route_class(_render))

Direction = Annotated[Literal["left", "right"], BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)]
_Sequence = list[StrictStr]


class PredictRequest(Closed):
    inputs: StrictStr | list[StrictStr] | list[_Sequence] = Field(
        description='"text", ["text"], ["prompt", "response"] or a batch of those as lists.')
    truncate: StrictBool | None = Field(None, description="Cut over-long inputs (default: the entry's policy).")
    truncation_direction: Direction = Field("right", description="Left or Right.")
    raw_scores: StrictBool = Field(False, description="false: sigmoid (one output) or softmax (several).")


class Prediction(Closed):
    score: float
    label: str


class EmptyInput(InvalidInput):
    status = 400
    type = "empty_input"


def _sequences(inputs) -> tuple[list[list[str]], bool]:
    """(sequences of one or two texts, whether the request was a batch)."""
    if isinstance(inputs, str):
        return [[inputs]], False
    if inputs and isinstance(inputs[0], str):
        return [inputs], False
    return inputs, True


def _item(seq: list[str], index: int):
    if len(seq) not in (1, 2):
        raise InvalidInput(f"inputs[{index}] has {len(seq)} texts: send one text or a pair", field="inputs")
    if not any(seq):
        raise EmptyInput("Input validation error: `inputs` cannot be empty", field="inputs")
    return item(text=seq[0]) if len(seq) == 1 else item(prompt=seq[0], response=seq[1])


@router.post("/predict", response_model=list[Prediction] | list[list[Prediction]])
async def predict(body: PredictRequest, request: Request, response: Response, registry: RegistryDep,
                  model: str | None = Query(None, description="Registry entry (default: the default one).")):
    """TEI's /predict: every label's score for one input, a pair, or a batch."""
    start = time.perf_counter()
    seqs, batch = _sequences(body.inputs)
    if not seqs:
        raise EmptyInput("Input validation error: `inputs` cannot be empty", field="inputs")
    limit = registry.settings.max_items_per_request
    if len(seqs) > limit:
        raise RequestTooLarge(f"Input validation error: batch size {len(seqs)} > maximum allowed batch size {limit}")
    items = [_item(s, i) for i, s in enumerate(seqs)]
    timing = Timing()
    truncation = None if body.truncate is None else (body.truncation_direction if body.truncate else "error")
    scorer, results = await score_items(request, registry, model, items,
                                        lambda i, part: (i, f"inputs[{i}]" if batch else "inputs"),
                                        Call(truncation=truncation, timing=timing))
    answers = []
    for r in results:
        labels, values = outputs(scorer, r)
        scores = values if body.raw_scores else activated(values)
        answers.append(sorted(({"score": s, "label": label} for label, s in zip(labels, scores)),
                              key=lambda p: -p["score"]))
    total = round((time.perf_counter() - start) * 1000)
    response.headers.update({
        "x-compute-type": "cpu" if all(d == "cpu" for d in _devices(scorer)) else "gpu",
        "x-total-time": str(total), "x-compute-time": str(total),
        "x-tokenization-time": str(round(timing.tokenize * 1000)), "x-queue-time": str(round(timing.queue * 1000)),
        "x-inference-time": str(round(timing.inference * 1000)),
        "x-compute-tokens": str(sum(r.tokens for r in results)),
        "x-compute-characters": str(sum(len(t) for s in seqs for t in s)),
    })
    return answers if batch else answers[0]


def _devices(scorer) -> list[str]:
    model = getattr(scorer, "model", None)
    return model.devices if model is not None else [d for m in scorer.members for d in _devices(m)]
