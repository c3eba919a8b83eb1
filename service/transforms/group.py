"""Group statistics: the baselines a transform can take from an item's group, and advantages.

Advantages, from the (shaped) rewards of the items that share a prompt or a `group`:
    grpo     (r - mean) / (std + 1e-4), std with Bessel's correction (TRL's defaults)
    rloo     r - the mean of the other members (leave-one-out)
    median   r - the median of the group (MC-GRPO)
    winrate  the share of the other members r beats, a tie counting one half
An item in a group of one gets advantage 0 (and group_size 1 says why).
"""

from __future__ import annotations

import statistics

EPS = 1e-4


def advantages(rewards: list[float], method: str) -> list[float]:
    n = len(rewards)
    if n == 1:
        return [0.0]
    if method == "grpo":
        mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
        return [(r - mean) / (std + EPS) for r in rewards]
    if method == "rloo":
        total = sum(rewards)
        return [r - (total - r) / (n - 1) for r in rewards]
    if method == "median":
        med = statistics.median(rewards)
        return [r - med for r in rewards]
    if method == "winrate":
        return [sum(1.0 if r > o else 0.5 if r == o else 0.0 for j, o in enumerate(rewards) if j != i) / (n - 1)
                for i, r in enumerate(rewards)]
    raise ValueError(f"unknown advantages {method!r}")


def baseline(rewards: list[float], how: str) -> float:
    return statistics.fmean(rewards) if how == "group_mean" else statistics.median(rewards)


def partition(n: int, groups) -> list[list[int]]:
    """Every item in exactly one group: the given groups, and each other item alone."""
    out, seen = [], set()
    for g in groups:
        members = [i for i in g if i not in seen]
        seen.update(members)
        if members:
            out.append(members)
    out.extend([i] for i in range(n) if i not in seen)
    return out
