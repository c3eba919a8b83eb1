"""What a backend scores: units.

A unit is a token prefix computed once (empty for a lone sequence) and the suffixes that attend to
it, each continuing the prefix's positions. Each suffix names the positions (within itself) whose
head outputs the scorer reads; every such position is one output row. A lone sequence pooled at
its last token is `Unit.single(ids, (len(ids) - 1,))`; a best-of-N group is one prefix and N suffixes.
A backend returns the rows of its units in order: unit by unit, suffix by suffix, position by position.

`share_across` finds lone units of one batch (separate requests) whose tokens begin alike: the
packed backend computes such a run once, as a prefix segment of its own (see PackedBatch.build).
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


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least its last token."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:  # each against the first, over what the ones before left shared
        p = 0
        while p < n and s[p] == first[p]:
            p += 1
        n = p
    return max(n, 0)


def share_across(units: list[Unit], min_tokens: int) -> list[tuple[int, list[int]]]:
    """Runs of lone units (no prefix, one suffix) that begin with the same tokens: (length of the
    shared run, indices of the units), each run at least `min_tokens` long and leaving every member
    its pooled positions and at least one token of its own; chosen to save the most tokens.

    Sorted, units that share a beginning sit next to each other, and a run is a stretch of that
    order sharing the least common prefix of its neighbours. A stretch either runs as one (saving
    (members - 1) x shared tokens) or splits where that least prefix falls, its parts deciding the
    same way: whichever saves more (the whole stretch on a tie: fewer segments)."""
    order = sorted((i for i, u in enumerate(units) if not u.prefix and len(u.suffixes) == 1),
                   key=lambda i: units[i].suffixes[0])
    # common[j]: tokens order[j] and order[j + 1] share, short of either's first pooled position
    common = [min(common_prefix([units[i].suffixes[0], units[k].suffixes[0]]), *units[i].pools[0],
                  *units[k].pools[0]) for i, k in zip(order, order[1:])]
    best: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = {}  # stretch -> (saving, runs)
    stack: list[tuple[int, int, tuple | None]] = [(0, len(order) - 1, None)] if len(order) > 1 else []
    while stack:  # depth-first, parts before their stretch (a loop: nesting can be as deep as the batch)
        lo, hi, split = stack.pop()
        if lo == hi:
            best[lo, hi] = (0, [])
            continue
        if split is None:  # the stretch's least shared length, and the stretches it splits into
            least = min(common[lo:hi])
            cuts = [j for j in range(lo, hi) if common[j] == least]
            subs = list(zip([lo] + [j + 1 for j in cuts], cuts + [hi]))
            stack.append((lo, hi, (least, subs)))
            stack.extend((a, b, None) for a, b in subs)
            continue
        least, subs = split
        saving = sum(best[sub][0] for sub in subs)
        whole = (hi - lo) * least if least >= min_tokens else 0
        best[lo, hi] = (whole, [(least, lo, hi)]) if whole and whole >= saving else \
            (saving, [run for sub in subs for run in best.pop(sub)[1]])
    runs = best[0, len(order) - 1][1] if best else []
    return [(shared, order[lo: hi + 1]) for shared, lo, hi in runs]
