"""Grouping: the members of a group that share a prompt become shared-prefix units.

The prefix is the longest common prefix of the members' *full* token sequences, so it is by
construction exactly what each full tokenisation starts with, whatever a chat template or a BPE
merge at the prompt/response boundary did. A unit holds as many members as fit the batch budget.
"""

from __future__ import annotations

from rewardserve.models.units import Unit, common_prefix

# Below this many shared tokens a group is not worth a prefix segment of its own.
MIN_SHARED_PREFIX = 8


def share_prefix(seqs: list[list[int]], pools: list[tuple[int, ...]],
                 max_tokens: int) -> tuple[list[tuple[Unit, list[int]]], int]:
    """(units with the positions in `seqs` of their members, members left out because they pool
    inside the prefix). Members not in a unit score alone."""
    if len(seqs) < 2:
        return [], 0
    p = common_prefix(seqs)
    if p < MIN_SHARED_PREFIX:
        return [], 0
    members = [j for j, q in enumerate(pools) if min(q) >= p]  # not e.g. a response of pad ids only
    units: list[tuple[Unit, list[int]]] = []
    chunk: list[int] = []
    tokens = p
    for j in members + [None]:
        if chunk and (j is None or tokens + len(seqs[j]) - p > max_tokens):
            if len(chunk) > 1:
                units.append((Unit(seqs[chunk[0]][:p], [seqs[c][p:] for c in chunk],
                                   [tuple(q - p for q in pools[c]) for c in chunk]), chunk))
            chunk, tokens = [], p
        if j is not None:
            chunk.append(j)
            tokens += len(seqs[j]) - p
    return units, len(seqs) - len(members)
