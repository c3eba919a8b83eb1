"""Scorers over other registry entries (ensembles, composites): the parts score every item
concurrently, each through its own queue and cache, so a part's cached score serves the combination
and direct requests alike."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

from rewardserve.aio import gather_or_cancel
from rewardserve.engine.types import Ticket
from rewardserve.errors import ServiceError
from rewardserve.models.tokenize import ItemLike
from rewardserve.scorers.base import Call, Result, Scorer
from rewardserve.transforms.shaping import score_shaped
from rewardserve.transforms.spec import TransformSpec


class Combination(Scorer):
    part: ClassVar[str]  # what a part is called in errors: member, component

    async def score_parts(self, parts: dict[str, Scorer], items: Sequence[ItemLike], call: Call,
                          transforms: dict[str, TransformSpec] | None = None) -> list[list[Result]]:
        """Each part's results, in the order of `parts`; a part's raw scores unless `transforms` shapes them
        (the parts' own entries' default transforms do not apply here)."""
        # each part has its own ticket: one part failing must not drop another's queued items under it
        return await gather_or_cancel(*(
            self._part(label, scorer, items, dataclasses.replace(call, ticket=Ticket(deadline=call.ticket.deadline)),
                       (transforms or {}).get(label))
            for label, scorer in parts.items()))

    async def _part(self, label: str, scorer: Scorer, items: Sequence[ItemLike], call: Call,
                    transform: TransformSpec | None) -> list[Result]:
        try:
            if transform is None:
                return await scorer.score(items, call)
            return await score_shaped(scorer, items, call, transform)
        except ServiceError as exc:
            named = f"{self.part} {label!r}" + (f" ({scorer.name})" if label != scorer.name else "")
            raise exc.reworded(f"{named} of {self.kind} {self.name!r}: {exc.message}") from None

    async def warmup(self) -> list[float]:
        return []  # its parts warm up as entries of their own
