"""Process rewards: a reward for every step of a solution, and their aggregate.

A process reward model (a model entry with `process`) reads each step at the tag that ends it: the
response is the steps, each followed by the step tag, joined by the separator (Math-Shepherd:
"step ки\\nstep ки"; Qwen2.5-Math-PRM: separator "" and the tag "<extra_0>"), and one forward pass
reads the head at every tag position. A step's reward is P(good):

    label tokens (a causal LM, Math-Shepherd style)  sigmoid(logit(good) - logit(bad))
    a classification head with 2 labels              softmax(head)[1]
    a classification head with 1 label               the head's output itself

Any other scorer (an outcome reward model, an ensemble, a judge, a composite) scores steps as
prefixes: step k's reward is the score, alone, of the response made of steps 1..k joined by the
separator; the prefixes of one solution are one group, so their prompt is computed once.

Aggregates (Stop Summation: Min-Form Credit Assignment Is All Process Reward Model Needs):
min (default), prod, mean, last, sum.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

from rewardserve.cache.tiered import Rows
from rewardserve.engine.scheduler import ModelRunner
from rewardserve.entries import ModelEntry
from rewardserve.errors import InvalidInput, ItemTooLong, ServiceError
from rewardserve.models.loading import LoadedModel, single_token
from rewardserve.models.tokenize import ItemLike, Plain, chat_of
from rewardserve.monitoring.metrics import Metrics
from rewardserve.scorers.base import Call, ModelScorer, Prepared, Result, Scorer
from rewardserve.transforms.fits import sigmoid

AGGREGATES = {
    "min": min,
    "prod": math.prod,
    "mean": statistics.fmean,
    "last": lambda values: values[-1],
    "sum": math.fsum,
}


@dataclass
class Solution:
    """Steps answering a prompt (or a chat, which the steps continue as the assistant's turn)."""

    steps: list[str]
    prompt: str | None = None
    messages: list | None = None


def response_item(solution: Solution, response: str) -> Plain:
    """The item whose response is `response`, in the solution's form."""
    if solution.prompt is not None:
        return Plain(prompt=solution.prompt, response=response)
    return Plain(messages=chat_of(solution) + [{"role": "assistant", "content": response}])


class ProcessScorer(ModelScorer):
    kind = "process_reward_model"

    def __init__(self, entry: ModelEntry, model: LoadedModel, runner: ModelRunner, metrics: Metrics,
                 fingerprint: str | None):
        super().__init__(model, runner, metrics, entry.truncation, fingerprint)
        self.entry = entry
        self.tag = entry.process.step_tag
        self.tag_id = single_token(model.encoder.tokenizer, self.tag, "process.step_tag", model.source)
        self.by_tokens = entry.process.labels is not None
        if not self.by_tokens and model.num_labels not in (1, 2):
            raise ValueError(f"process: a classification head with {model.num_labels} labels; a process reward "
                             "model's has 1 (a score) or 2 (bad, good)")

    def check(self, call: Call) -> None:
        if call.heads is not None:
            raise InvalidInput(f"heads: {self.name} is a process reward model; heads apply to outcome reward models",
                               field="heads")

    def value(self, row: list[float]) -> float:
        if self.by_tokens:
            return sigmoid(row[0] - row[1])
        return row[0] if len(row) == 1 else sigmoid(row[1] - row[0])

    def _tagged(self, items: Sequence[ItemLike], steps: Sequence[int], truncation: str,
                limit: int | None) -> list[Prepared]:
        """Encode items whose responses end each step with the tag; read at every tag (`steps[i]` of them)."""
        out = []
        for i, e in enumerate(self.model.encoder.encode(items, truncation, limit)):
            at = tuple(j for j, t in enumerate(e.ids) if t == self.tag_id)
            if len(at) != steps[i]:
                if e.truncated:
                    raise ItemTooLong(f"cut to {len(e.ids)} tokens, the item keeps {len(at)} of its {steps[i]} step "
                                      "tags; send shorter steps or raise max_length", index=i)
                raise InvalidInput(f"the step tag {self.tag!r} occurs {len(at)} times in the tokenised item, not once "
                                   f"per step ({steps[i]}): the prompt or a step contains it, or tokenisation merged "
                                   "it with its neighbours", index=i)
            out.append(Prepared(e.ids, at, e.truncated))
        return out

    def prepare(self, items: Sequence[ItemLike], truncation: str, limit: int | None) -> list[Prepared]:
        """/v1/score: the response is one step."""
        one = []
        for i, it in enumerate(items):
            if it.input_ids is not None:
                raise InvalidInput("a process reward model reads text: send prompt/response, messages or text (or "
                                   "steps to /v1/score_steps)", index=i, part="input_ids")
            self._check_step(it.response if it.prompt is not None else
                             chat_of(it)[-1]["content"] if it.messages is not None else it.text, i, None)
            if it.prompt is not None:
                one.append(Plain(prompt=it.prompt, response=it.response + self.tag))
            elif it.messages is not None:
                chat = chat_of(it)
                one.append(Plain(messages=chat[:-1] + [{**chat[-1], "content": chat[-1]["content"] + self.tag}]))
            else:
                one.append(Plain(text=it.text + self.tag, add_special_tokens=it.add_special_tokens))
        return self._tagged(one, [1] * len(one), truncation, limit)

    def _check_step(self, step: str, index: int, k: int | None) -> None:
        if self.tag in step:
            where = f"steps[{k}]" if k is not None else None
            raise InvalidInput(f"contains the step tag {self.tag!r}, which marks where each step ends", index=index,
                               part=where)

    def finish(self, prepared: Prepared, rows: Rows, cached: bool, call: Call) -> Result:
        values = [self.value(r) for r in rows]
        return Result(reward=values[-1], tokens=len(prepared.ids), truncated=prepared.truncated, cached=cached,
                      step_rewards=values)

    async def score_steps(self, solutions: Sequence[Solution], separator: str, call: Call) -> list[Result]:
        """Each solution in one forward pass, read at every step's tag."""
        self.check(call)
        for i, s in enumerate(solutions):
            for k, step in enumerate(s.steps):
                self._check_step(step, i, k)
        items = [response_item(s, separator.join(step + self.tag for step in s.steps)) for s in solutions]
        prepared = self._tagged(items, [len(s.steps) for s in solutions], call.truncation or self.truncation,
                                call.max_tokens)
        if call.meter is not None:
            call.meter.add(sum(len(p.ids) for p in prepared))
        runs = await self.runner.run(prepared, lane=call.lane, ticket=call.ticket, use_cache=call.use_cache,
                                     groups=call.groups, timing=call.timing)
        return [self.finish(p, rows, cached, call) for p, (rows, cached) in zip(prepared, runs)]

    def card(self) -> dict[str, Any]:
        p = self.entry.process
        labels = None if p.labels is None else {"good": p.labels.good, "bad": p.labels.bad}
        return self.checkpoint_card() | dict(step_tag=p.step_tag, label_tokens=labels)


async def score_steps(scorer: Scorer, solutions: Sequence[Solution], call: Call, separator: str = "\n",
                      aggregate: str = "min") -> list[Result]:
    """Per solution: `step_rewards` and their aggregate as `reward`."""
    for i, s in enumerate(solutions):
        if not s.steps:
            raise InvalidInput("a solution needs at least one step", index=i, part="steps")
    if isinstance(scorer, ProcessScorer):
        results = await scorer.score_steps(solutions, separator, call)
    else:
        items, groups, spans = [], [], []
        for s in solutions:
            first = len(items)
            items += [response_item(s, separator.join(s.steps[: k + 1])) for k in range(len(s.steps))]
            groups.append(list(range(first, len(items))))
            spans.append((first, len(items)))
        try:
            scored = await scorer.score(items, dataclasses.replace(call, groups=groups))
        except ServiceError as exc:
            if exc.index is None or exc.field is not None:
                raise
            i = next(i for i, (a, b) in enumerate(spans) if a <= exc.index < b)
            raise exc.moved(i, f"steps[{exc.index - spans[i][0]}]") from None
        results = []
        for a, b in spans:
            part = scored[a:b]
            results.append(Result(reward=part[-1].reward, tokens=sum(r.tokens for r in part),
                                  truncated=any(r.truncated for r in part), cached=all(r.cached for r in part),
                                  step_rewards=[r.reward for r in part]))
    how = AGGREGATES[aggregate]
    for r in results:
        r.reward = how(r.step_rewards)
    return results
