"""Shaping a scorer's results: the transform (the request's, else the entry's) and group advantages.

The scorer's results hold raw rewards (what the cache keeps); each shaped item keeps its `raw_reward`
beside the shaped `reward`. A `reference` baseline scores each item's reference response with the
same scorer, in the same call: the reference joins the item's group, so its prompt is computed once
with the item's, and it is cached like any item.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from rewardserve.errors import InvalidInput
from rewardserve.models.tokenize import Plain, chat_of
from rewardserve.scorers.base import Call, Result, Scorer
from rewardserve.transforms.group import advantages as advantages_of
from rewardserve.transforms.group import baseline, partition
from rewardserve.transforms.pointwise import shape
from rewardserve.transforms.spec import TransformSpec


def reference_item(item: Any, index: int) -> Plain:
    ref = getattr(item, "reference", None)
    if ref is None:
        raise InvalidInput("the baseline is 'reference': every item needs its reference response", index=index,
                           part="reference")
    if item.prompt is not None:
        return Plain(prompt=item.prompt, response=ref)
    if item.messages is not None and len(item.messages) > 1:
        return Plain(messages=chat_of(item)[:-1] + [{"role": "assistant", "content": ref}])
    raise InvalidInput("a reference answers a prompt: it needs a prompt/response or a chat item", index=index,
                       part="reference")


def check(scorer: Scorer, spec: TransformSpec | None) -> None:
    if spec is None:
        return
    if spec.kind == "length" and scorer.length_fit is None:
        raise InvalidInput(f"transform: {scorer.name} has no length fit (set the entry's length_fit to a file "
                           "`rewardserve calibrate length` wrote)", field="transform")
    if spec.kind == "calibrated" and scorer.calibration is None:
        raise InvalidInput(f"transform: {scorer.name} has no calibration (set the entry's calibration to a file "
                           "`rewardserve calibrate pairs` wrote)", field="transform")
    if spec.kind == "calibrated" and spec.baseline is None and scorer.calibration.domain == "pairwise":
        raise InvalidInput("transform: a pairwise calibration gives win probabilities against a baseline: set one",
                           field="transform")


async def score_shaped(scorer: Scorer, items: Sequence[Any], call: Call, transform: TransformSpec | None = None,
                       advantages: str | None = None) -> list[Result]:
    spec = transform or scorer.transform
    if spec is None and advantages is None:
        return await scorer.score(items, call)
    check(scorer, spec)
    n = len(items)
    groups = partition(n, call.groups)
    if spec is not None and spec.baseline == "reference":
        refs = [reference_item(it, i) for i, it in enumerate(items)]
        scoring = [g + [n + i for i in g] for g in groups]  # each reference beside its item: one prompt
        results = await scorer.score([*items, *refs], dataclasses.replace(call, groups=scoring))
        results, ref_rewards = results[:n], [r.reward for r in results[n:]]
    else:
        results = await scorer.score(items, call)
        ref_rewards = None
    if spec is not None:
        bases: list[float | None] = [None] * n
        for g in groups:
            for i in g:
                if ref_rewards is not None:
                    bases[i] = ref_rewards[i]
                elif spec.needs_group:
                    bases[i] = baseline([results[j].reward for j in g], spec.baseline)
                elif isinstance(spec.baseline, float):
                    bases[i] = spec.baseline
        for r, base in zip(results, bases):
            r.raw_reward = r.reward
            r.reward = shape(spec, r.reward, base, r.tokens, scorer.length_fit, scorer.calibration)
    if advantages is not None:
        for g in groups:
            for i, a in zip(g, advantages_of([results[i].reward for i in g], advantages)):
                results[i].advantage, results[i].group_size = a, len(g)
    return results
