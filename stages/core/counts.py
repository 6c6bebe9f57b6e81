"""How a ratio or a real number becomes a whole count: one rounding rule for every unit kind and for the criteria
that stop at a prune target (sublayer_sleb), which sit below selection in the room order."""

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
