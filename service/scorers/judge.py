"""A generative judge: a causal LM asked a question, scored by its verdict tokens; no generation.

Each item is rendered into the entry's Jinja template (over `prompt`, `response`, `criteria`,
`reference` and `messages`), which becomes the user turn of the judge's chat template with the
generation prompt after it; the verdict is the next token. The reward is its log-odds,

    reward = logit(yes) - logit(no) = log P(yes) - log P(no)    (the softmax's normaliser cancels)
    p_yes  = P(yes) / (P(yes) + P(no)) = sigmoid(reward)

read in one forward pass at the last position. Only the verdict tokens' rows of the LM head are
computed (models/loading.py), on the packed fast path by the fused reward head.

Pairwise judging (`pairwise` in the entry, used by /v1/compare) asks the pairwise template with a
first and with b first and averages the two log-odds that a is better: a judge's position bias
cancels out of the average (Assessing Judging Bias in Large Reasoning Models).
"""

from __future__ import annotations

from typing import Any, Sequence

import jinja2

from rewardserve.cache.tiered import Rows
from rewardserve.engine.scheduler import ModelRunner
from rewardserve.entries import JudgeEntry, compile_template
from rewardserve.errors import InvalidInput
from rewardserve.models.loading import LoadedModel
from rewardserve.models.tokenize import ItemLike, chat_of
from rewardserve.monitoring.metrics import Metrics
from rewardserve.scorers.base import Call, ModelScorer, Prepared, Result
from rewardserve.transforms.fits import sigmoid


def template_values(item: ItemLike, index: int) -> dict[str, Any]:
    """What a template sees of an item: its prompt and response (a chat's last turn is the response and
    the user turn before it the prompt; a text item is a response without a prompt), and its messages."""
    if item.input_ids is not None:
        raise InvalidInput("a judge reads text: send prompt/response, messages or text, not input_ids", index=index,
                           part="input_ids")
    if item.prompt is not None:
        return dict(prompt=item.prompt, response=item.response, messages=None)
    if item.messages is not None:
        chat = chat_of(item)
        users = [m["content"] for m in chat[:-1] if m["role"] == "user"]
        return dict(prompt=users[-1] if users else "", response=chat[-1]["content"], messages=chat)
    if item.response is not None:  # a peer's text item that says which part is the response
        return dict(prompt=item.text[: len(item.text) - len(item.response)], response=item.response, messages=None)
    return dict(prompt="", response=item.text, messages=None)


class JudgeScorer(ModelScorer):
    kind = "judge"

    def __init__(self, entry: JudgeEntry, model: LoadedModel, runner: ModelRunner, metrics: Metrics,
                 fingerprint: str | None):
        super().__init__(model, runner, metrics, entry.truncation, fingerprint)
        self.entry = entry
        self.template = compile_template(entry.template)
        self.pair_template = compile_template(entry.pairwise.template) if entry.pairwise else None

    @property
    def pairwise(self) -> bool:
        return self.pair_template is not None

    def check(self, call: Call) -> None:
        if call.heads is not None:
            raise InvalidInput(f"heads: {self.name} is a judge; heads apply to reward models", field="heads")
        if call.truncation == "right":
            raise InvalidInput("truncation: a judge's verdict follows its question, which cutting the end would "
                               "remove; use left", field="truncation")

    def _render(self, template: jinja2.Template, values: dict[str, Any], index: int) -> str:
        try:
            return template.render(criteria=self.entry.criteria, **values)
        except jinja2.TemplateError as exc:
            raise InvalidInput(f"the judge's template failed on this item: {exc}", index=index) from None

    def prepare(self, items: Sequence[ItemLike], truncation: str, limit: int | None) -> list[Prepared]:
        texts = [self._render(self.template, template_values(it, i) | {"reference": getattr(it, "reference", None)},
                              i) for i, it in enumerate(items)]
        return self._questions(texts, truncation, limit)

    def _questions(self, texts: list[str], truncation: str, limit: int | None) -> list[Prepared]:
        return [Prepared(e.ids, (len(e.ids) - 1,), e.truncated)
                for e in self.model.encoder.encode_questions(texts, truncation, limit)]

    def finish(self, prepared: Prepared, rows: Rows, cached: bool, call: Call) -> Result:
        [logits] = rows
        reward = logits[0] - logits[1]
        return Result(reward=reward, tokens=len(prepared.ids), truncated=prepared.truncated, cached=cached,
                      p_yes=sigmoid(reward))

    async def compare(self, pairs: Sequence[tuple[str, str, str]], call: Call) -> list[tuple[float, float, Result]]:
        """Per (prompt, a, b): the log-odds that a is better asked with a first and with b first (as a's
        log-odds), and a result whose reward is their mean."""
        self.check(call)
        texts = []
        for k, (prompt, a, b) in enumerate(pairs):
            for first, second in ((a, b), (b, a)):
                texts.append(self._render(self.pair_template, dict(prompt=prompt, a=first, b=second), k))
        prepared = self._questions(texts, call.truncation or self.truncation, call.max_tokens)
        if call.meter is not None:
            call.meter.add(sum(len(p.ids) for p in prepared))
        runs = await self.runner.run(prepared, lane=call.lane, ticket=call.ticket, use_cache=call.use_cache,
                                     groups=call.groups, timing=call.timing)
        out = []
        for k in range(len(pairs)):
            (ab, c1), (ba, c2) = runs[2 * k], runs[2 * k + 1]
            first = ab[0][2] - ab[0][3]  # rows: yes, no, a, b
            swapped = ba[0][3] - ba[0][2]  # b was shown first: its "b" verdict is a's
            mean = (first + swapped) / 2
            tokens = len(prepared[2 * k].ids) + len(prepared[2 * k + 1].ids)
            out.append((first, swapped, Result(reward=mean, tokens=tokens, cached=c1 and c2, p_yes=sigmoid(mean),
                                               truncated=prepared[2 * k].truncated or prepared[2 * k + 1].truncated)))
        return out

    def card(self) -> dict[str, Any]:
        e = self.entry
        return self.checkpoint_card() | dict(
            template=e.template, verdict={"yes": e.verdict.yes, "no": e.verdict.no}, verdict_ids=self.model.token_ids,
            criteria=e.criteria, pairwise=e.pairwise is not None)
