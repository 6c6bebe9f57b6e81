"""Targets: how a ratio or count becomes a whole number of units. One rounding rule for every unit kind."""

from __future__ import annotations

import math


def round_count(x: float, rule: str = "nearest") -> int:
    """A unit count from a real number: ``nearest`` rounds half up; ``floor`` / ``ceil`` as named.

    The 1e-9 guard keeps products like 0.35 × 20 (6.999999…) on the intended side.
    """
    if rule == "floor":
        return math.floor(x + 1e-9)
    if rule == "ceil":
        return math.ceil(x - 1e-9)
    return math.floor(x + 0.5 + 1e-9)


def ratio_to_params(ratio: float, total: int) -> int:
    """The parameter budget a ratio of all parameters removes."""
    return round_count(ratio * total)


def blocks_for_ratio(ratio: float, total_params: int, block_params: float, rule: str) -> int:
    """Blocks of one decoder are equal in size, so a parameter ratio is a block count."""
    return round_count(ratio * total_params / block_params, rule)


def hidden_channels_to_remove(d: int, heads: int, want: float) -> int:
    """The channel count nearest ``want`` that keeps the width a multiple of ``heads`` (LlamaConfig refuses others)."""
    return min((c for c in range(d + 1) if (d - c) % heads == 0), key=lambda c: (abs(c - want), c))


def lowest(scores: list[float], k: int) -> list[int]:
    """The indices of the ``k`` lowest scores (ties: the lower index), in ascending index order."""
    return sorted(sorted(range(len(scores)), key=lambda j: (scores[j], j))[:k])
