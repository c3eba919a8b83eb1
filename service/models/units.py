"""What a backend scores: plain token-id sequences, and shared-prefix groups.

A `Shared` group is a prompt prefix computed once plus the responses that attend to it. A backend
returns one row of scores per plain sequence and one per response of a group, in order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Shared:
    prefix: list[int]  # the tokens every member's full sequence starts with
    suffixes: list[list[int]]  # each member's remaining tokens (never empty)
    pools: list[int]  # each member's pooled index within its suffix

    @property
    def tokens(self) -> int:
        return len(self.prefix) + sum(len(s) for s in self.suffixes)

    @property
    def full_tokens(self) -> int:
        """Tokens the members would cost scored one by one."""
        return len(self.prefix) * len(self.suffixes) + sum(len(s) for s in self.suffixes)


Unit = list[int] | Shared


def unit_tokens(unit: Unit) -> int:
    return unit.tokens if isinstance(unit, Shared) else len(unit)


def unit_rows(unit: Unit) -> int:
    return len(unit.suffixes) if isinstance(unit, Shared) else 1


def flatten(units: list[Unit]) -> list[list[int]]:
    """Every row's full token sequence (what a backend without prefix sharing scores)."""
    out: list[list[int]] = []
    for u in units:
        if isinstance(u, Shared):
            out.extend(u.prefix + s for s in u.suffixes)
        else:
            out.append(u)
    return out
