"""Request and response bodies of the public API.

Inputs are strict (no silent coercion of numbers into strings or floats into token ids) and closed
(unknown fields are rejected), so a typo surfaces as a 422 naming the field and the item.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from rewardserve.transforms.spec import Advantages, TransformSpec

Truncation = Literal["left", "right", "error"]
Priority = Literal["interactive", "bulk"]


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Closed):
    role: StrictStr = Field(min_length=1)
    content: StrictStr


class Item(Closed):
    """One thing to score, in exactly one of four forms."""

    prompt: StrictStr | None = Field(None, description="User turn; requires `response`.")
    response: StrictStr | None = Field(None, description="Assistant turn scored against `prompt` (may be empty).")
    messages: list[Message] | None = Field(None, min_length=1, description="A chat, rendered by the chat template.")
    text: StrictStr | None = Field(None, min_length=1, description="Raw text, tokenised as it is.")
    input_ids: list[StrictInt] | None = Field(None, min_length=1, description="Token ids, scored as they are.")
    add_special_tokens: StrictBool | None = Field(
        None, description="For `text` only: add the tokenizer's special tokens (default true; BOS never doubles)."
    )
    group: StrictStr | None = Field(
        None, description="Items with the same group (or the same prompt) are scored together, sharing the prompt."
    )
    reference: StrictStr | None = Field(
        None, description="A reference response to the same prompt: the baseline of transforms with baseline "
                          "'reference' (prompt/response and chat items).")

    @model_validator(mode="after")
    def _one_form(self) -> "Item":
        forms = [
            name
            for name, present in (
                ("prompt/response", self.prompt is not None or self.response is not None),
                ("messages", self.messages is not None),
                ("text", self.text is not None),
                ("input_ids", self.input_ids is not None),
            )
            if present
        ]
        if len(forms) != 1:
            raise ValueError(
                "an item needs exactly one of prompt+response, messages, text or input_ids"
                + (f" (got {' and '.join(forms)})" if forms else " (got none)")
            )
        if forms[0] == "prompt/response":
            if self.prompt is None or self.response is None:
                raise ValueError("prompt and response go together: send both")
            if not self.prompt:
                raise ValueError("prompt is empty")
        if self.add_special_tokens is not None and self.text is None:
            raise ValueError("add_special_tokens applies to text items only")
        if self.reference is not None and forms[0] not in ("prompt/response", "messages"):
            raise ValueError("a reference answers a prompt: it goes with prompt/response or messages items")
        return self



def item(**fields) -> Item:
    """An item built by a route from fields it has already validated (no second validation)."""
    return Item.model_construct(**(dict.fromkeys(Item.model_fields) | fields))


class Options(Closed):
    """Per-request knobs shared by every scoring endpoint."""

    model: StrictStr | None = Field(None, description="A registry entry's name (see /v1/models); default: the "
                                                      "server's default entry.")
    truncation: Truncation | None = Field(None, description="Over-long items: left, right, or error (413). Default: "
                                                            "the entry's.")
    priority: Priority = Field("interactive", description="interactive batches go before bulk ones.")
    cache: StrictBool = Field(True, description="false: neither read nor write the score cache for this request.")
    heads: dict[StrictStr, float] | None = Field(
        None, min_length=1, description="reward = sum of weight x head output, by head name (models with several "
                                        "heads; default: the entry's, else head 0).")
    transform: TransformSpec | None = Field(None, description="Shape the rewards (default: the entry's transform); "
                                                              "every item keeps its raw_reward.")
    advantages: Advantages | None = Field(None, description="Also each item's advantage within its group: grpo, "
                                                            "rloo, median or winrate.")
    timeout: float | None = Field(None, gt=0, description="Seconds this request may take (504 past them; capped by "
                                                          "the server's max_request_timeout_s). The "
                                                          "X-Request-Timeout header sets it too.")


class ScoreRequest(Options):
    items: list[Item] = Field(min_length=1, description="Items to score; rewards come back in this order.")


class BestOfNRequest(Options):
    prompt: StrictStr | None = Field(None, min_length=1, description="The user turn every candidate answers.")
    messages: list[Message] | None = Field(None, min_length=1, description="The chat so far; each candidate is "
                                           "appended as the assistant's turn.")
    candidates: list[StrictStr] = Field(min_length=1, description="Responses to rank.")
    top_k: int | None = Field(None, ge=1, description="Return only the best k indices in `ranking`.")

    @model_validator(mode="after")
    def _one_context(self) -> "BestOfNRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt or messages")
        return self


class BestOfNResponse(BaseModel):
    model: str
    best_index: int
    ranking: list[int] = Field(description="Candidate indices, best first.")
    rewards: list[float] = Field(description="Rewards in candidate order (transformed, when a transform applied).")
    raw_rewards: list[float] | None = Field(None, description="The rewards before the transform, when one applied.")
    margin: float | None = Field(description="Best minus second best (null with one candidate).")
    usage: Usage


class Pair(Closed):
    prompt: StrictStr = Field(min_length=1)
    a: StrictStr
    b: StrictStr


class LengthTie(Closed):
    """WildBench-style: a narrow win by a much longer response counts as a tie."""

    chars: int = Field(ge=0, description="The winner is more than this many characters longer than the loser...")
    margin: float = Field(ge=0, description="...and wins by a reward margin below this: a tie.")


class CompareRequest(Options):
    prompt: StrictStr | None = Field(None, min_length=1)
    a: StrictStr | None = None
    b: StrictStr | None = None
    pairs: list[Pair] | None = Field(None, min_length=1, description="Several comparisons at once.")
    length_tie: LengthTie | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> "CompareRequest":
        single = (self.prompt, self.a, self.b)
        if self.pairs is None and any(v is None for v in single):
            raise ValueError("send prompt, a and b, or a pairs list")
        if self.pairs is not None and any(v is not None for v in single):
            raise ValueError("send either prompt/a/b or pairs, not both")
        return self


class Comparison(BaseModel):
    reward_a: float
    reward_b: float
    raw_reward_a: float | None = None
    raw_reward_b: float | None = None
    p_a_better: float = Field(description="Bradley-Terry: sigmoid of the raw rewards' difference; with a calibrated "
                                          "transform, the calibration of it.")
    winner: Literal["a", "b", "tie"]


class CompareResponse(BaseModel):
    model: str
    results: list[Comparison]
    usage: Usage


class ItemResult(BaseModel):
    reward: float
    scores: dict[str, float] | None = Field(None, description="Every head's output by name, when the model has "
                                                               "several.")
    members: dict[str, float] | None = Field(None, description="Ensembles: each member's reward, before "
                                                                "normalisation and aggregation.")
    disagreement: float | None = Field(None, description="Ensembles: population std of the aggregated member "
                                                         "rewards.")
    raw_reward: float | None = Field(None, description="The reward before the transform, when one applied.")
    advantage: float | None = Field(None, description="The advantage within the item's group, when asked.")
    group_size: int | None = Field(None, description="The size of that group (1: advantage 0).")
    tokens: int = Field(description="Tokens scored (an ensemble's: summed over its members).")
    truncated: bool
    cached: bool


class Usage(BaseModel):
    tokens: int


class ScoreResponse(BaseModel):
    model: str
    rewards: list[float]
    items: list[ItemResult]
    usage: Usage


class ModelCard(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: str
    object: Literal["model"] = "model"
    kind: Literal["reward_model", "ensemble"]
    # reward models
    source: str | None = None
    architecture: str | None = None
    num_labels: int | None = None
    labels: list[str] | None = None
    heads: dict[str, float] | None = Field(None, description="The entry's head weights (null: head 0).")
    max_length: int | None = None
    dtype: str | None = None
    devices: list[str] | None = None
    backend: str | None = Field(None, description="packed (the fast path) or hf (padded "
                                                  "AutoModelForSequenceClassification).")
    attention: str | None = Field(None, description="The packed path's attention: varlen_attn (CUDA), C++ kernel or "
                                                    "SDPA (CPU); empty on the hf path.")
    fingerprint: str | None = Field(None, description="Digest of the weights and config (set when caching is on).")
    # ensembles
    members: list[str] | None = None
    aggregate: str | None = None
    lambda_: float | None = Field(None, alias="lambda")
    normalize: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    type: str
    message: str
    index: int | None = None
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict = {
    code: {"model": ErrorBody, "description": desc}
    for code, desc in (
        (400, "Body is not valid JSON."),
        (404, "Unknown model."),
        (413, "Too many items, or an item too long with truncation=error."),
        (422, "Invalid input; `index` names the item."),
        (401, "No API key (the server has keys)."),
        (403, "A wrong API key."),
        (429, "Overloaded, or over this key's quota; retry after the Retry-After header's seconds."),
        (503, "Not ready, draining, or the batch failed on its device."),
        (504, "The request's deadline passed."),
    )
}

PositiveInt = Annotated[int, Field(ge=1)]
