"""What a backend scores: units.

A unit is a token prefix computed once (empty for a lone sequence) and the suffixes that attend to
it, each continuing the prefix's positions. Each suffix names the positions (within itself) whose
head outputs the scorer reads; every such position is one output row. A lone sequence pooled at
its last token is `Unit.single(ids, (len(ids) - 1,))`; a best-of-N group is one prefix and N suffixes.
A backend returns the rows of its units in order: unit by unit, suffix by suffix, position by position.
"""

from __future__ import annotations

from dataclasses import dataclass

from rewardserve.models.pooling import last_token_index


@dataclass(frozen=True, slots=True)
class Unit:
    prefix: list[int]  # the tokens every suffix's full sequence starts with ([] for a lone sequence)
    suffixes: list[list[int]]  # each suffix's own tokens (never empty)
    pools: list[tuple[int, ...]]  # per suffix: the positions within it that become output rows

    @classmethod
    def single(cls, ids: list[int], pools: tuple[int, ...]) -> "Unit":
        return cls([], [ids], [pools])

    @property
    def rows(self) -> int:
        return sum(len(p) for p in self.pools)

    @property
    def tokens(self) -> int:
        """Tokens the device computes."""
        return len(self.prefix) + sum(len(s) for s in self.suffixes)

    @property
    def full_tokens(self) -> int:
        """Tokens the suffixes would cost scored one by one, each with the whole prefix."""
        return len(self.prefix) * len(self.suffixes) + sum(len(s) for s in self.suffixes)

    def sequences(self) -> list[tuple[list[int], tuple[int, ...]]]:
        """Each suffix as a whole sequence with its pooled positions in it (for backends that do not
        share prefixes)."""
        p = len(self.prefix)
        return [(self.prefix + s, tuple(p + q for q in pools)) for s, pools in zip(self.suffixes, self.pools)]


def lone(seqs: list[list[int]], pad_token_id: int | None) -> list[Unit]:
    """Each sequence a unit of its own, pooled where HF's sequence classifier pools it."""
    return [Unit.single(s, (last_token_index(s, pad_token_id),)) for s in seqs]
