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
        None, description="The reference answer: a verifier's ground truth (`label` and `ground_truth` are "
                          "accepted as its aliases), a judge template's `reference`, and the baseline response of "
                          "transforms with baseline 'reference'.")

    label: StrictStr | None = Field(None, description="`reference` as OpenRLHF and slime name it.")
    ground_truth: StrictStr | None = Field(None, description="`reference` as verl names it.")

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
        given = [k for k in REFERENCE_ALIASES if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are the same field (the reference answer): send one")
        if given and given[0] != "reference":
            self.reference, self.label, self.ground_truth = getattr(self, given[0]), None, None
        if self.reference is not None and forms[0] == "input_ids":
            raise ValueError("a reference is text: it goes with prompt/response, messages or text items")
        return self


REFERENCE_ALIASES = ("reference", "label", "ground_truth")



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
    reference: StrictStr | None = Field(None, description="The reference answer (a verifier's ground truth, a "
                                                          "judge's `reference`).")

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
    reference: StrictStr | None = Field(None, description="The reference answer (a verifier's ground truth); "
                                                          "without it each response is the other's reference.")


class LengthTie(Closed):
    """WildBench-style: a narrow win by a much longer response counts as a tie."""

    chars: int = Field(ge=0, description="The winner is more than this many characters longer than the loser...")
    margin: float = Field(ge=0, description="...and wins by a reward margin below this: a tie.")


class CompareRequest(Options):
    prompt: StrictStr | None = Field(None, min_length=1)
    a: StrictStr | None = None
    b: StrictStr | None = None
    reference: StrictStr | None = Field(None, description="The reference answer (a verifier's ground truth); "
                                                          "without it each response is the other's reference.")
    pairs: list[Pair] | None = Field(None, min_length=1, description="Several comparisons at once.")
    length_tie: LengthTie | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> "CompareRequest":
        single = (self.prompt, self.a, self.b, self.reference)
        if self.pairs is None and any(v is None for v in single[:3]):
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
                                          "transform, the calibration of it; a pairwise judge's: sigmoid of its mean "
                                          "log-odds over both orders.")
    winner: Literal["a", "b", "tie"]
    position_log_odds: list[float] | None = Field(None, description="A pairwise judge: its log-odds that a is better "
                                                                    "asked with a first, then with b first.")


class CompareResponse(BaseModel):
    model: str
    results: list[Comparison]
    usage: Usage


class StepOptions(Closed):
    """The options of /v1/score_steps (shaping applies to single rewards, not to steps)."""

    model: StrictStr | None = Field(None, description="A registry entry's name; default: the server's default entry.")
    truncation: Truncation | None = Field(None, description="Over-long items: left, right, or error (413).")
    priority: Priority = Field("interactive", description="interactive batches go before bulk ones.")
    cache: StrictBool = Field(True, description="false: neither read nor write the score cache for this request.")
    timeout: float | None = Field(None, gt=0, description="Seconds this request may take (504 past them).")
    aggregate: Literal["min", "prod", "mean", "last", "sum"] = Field(
        "min", description="How the step rewards make the solution's reward (min: Stop Summation, Min-Form Credit "
                           "Assignment).")
    separator: StrictStr = Field("\n", description="What joins the steps into the response.")


class Solution(Closed):
    prompt: StrictStr | None = Field(None, min_length=1, description="The question the steps answer.")
    messages: list[Message] | None = Field(None, min_length=1, description="The chat so far; the steps are the "
                                                                           "assistant's next turn.")
    steps: list[StrictStr] = Field(min_length=1, description="The solution's steps, in order.")

    @model_validator(mode="after")
    def _one_context(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt or messages")
        return self


class StepsRequest(StepOptions):
    prompt: StrictStr | None = Field(None, min_length=1, description="One solution: its question...")
    messages: list[Message] | None = Field(None, min_length=1, description="...or its chat so far...")
    steps: list[StrictStr] | None = Field(None, min_length=1, description="...and its steps.")
    solutions: list[Solution] | None = Field(None, min_length=1, description="The batch form: several solutions.")

    @model_validator(mode="after")
    def _one_shape(self) -> "StepsRequest":
        single = self.prompt is not None or self.messages is not None or self.steps is not None
        if single == (self.solutions is not None):
            raise ValueError("send one solution (prompt or messages, and steps) or a solutions list")
        if single:
            if (self.prompt is None) == (self.messages is None):
                raise ValueError("send exactly one of prompt or messages")
            if self.steps is None:
                raise ValueError("steps: the solution's steps are missing")
        return self


class StepResult(BaseModel):
    reward: float = Field(description="The aggregate of the step rewards.")
    step_rewards: list[float]
    tokens: int
    truncated: bool
    cached: bool


class StepsResponse(BaseModel):
    model: str
    aggregate: str
    reward: float | None = Field(None, description="One solution: its aggregate reward.")
    step_rewards: list[float] | None = Field(None, description="One solution: its step rewards.")
    results: list[StepResult] = Field(description="Per solution, in order (one for the single form).")
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
    p_yes: float | None = Field(None, description="Judges: P(yes) / (P(yes) + P(no)) at the verdict; the reward is "
                                                  "its log-odds.")
    reason: str | None = Field(None, description="Verifiers: why the score is what it is (correct, wrong answer, "
                                                 "timed out, ...).")
    step_rewards: list[float] | None = Field(None, description="/v1/score_steps: each step's reward.")
    components: dict[str, float] | None = Field(None, description="Composites: each component's value as it "
                                                                  "entered the total (transformed, gates applied).")
    gated: list[str] | None = Field(None, description="Composites: the components a gate set to 0.")
    passed: dict[str, bool] | None = Field(None, description="Composites: each thresholded component's value >= "
                                                             "its threshold.")
    reasons: dict[str, str] | None = Field(None, description="Composites: their verifier components' reasons.")
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
    kind: Literal["reward_model", "process_reward_model", "ensemble", "judge", "verifier", "composite"]
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
    # process reward models
    step_tag: str | None = None
    label_tokens: dict[str, str] | None = None
    # judges
    template: str | None = None
    verdict: dict[str, str] | None = None
    verdict_ids: dict[str, int] | None = Field(None, description="The token ids of the verdicts (and pairwise "
                                                                 "verdicts) by config key.")
    criteria: str | None = None
    pairwise: bool | None = Field(None, description="Whether /v1/compare asks it pairwise, in both orders.")
    # verifiers
    type: str | None = None
    checker_version: str | None = None
    timeout_s: float | None = None
    pattern: str | None = None
    case_sensitive: bool | None = None
    needs_reference: bool | None = Field(None, description="Whether items must carry `reference` (verifiers, "
                                                           "composites with one).")
    # composites
    components: dict[str, str] | None = None
    total: str | None = None
    gates: dict[str, dict] | None = None
    thresholds: dict[str, float] | None = None
    transforms: dict[str, dict] | None = None


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
