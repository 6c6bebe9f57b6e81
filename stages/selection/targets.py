"""Targets: how a ratio or count becomes a whole number of units. One rounding rule for every unit kind."""

from __future__ import annotations

# one rounding rule, shared with the criteria (stages.core.counts); re-exported for selection's callers
from prunelab.stages.core.counts import ratio_to_params as ratio_to_params
from prunelab.stages.core.counts import round_count as round_count


def blocks_for_ratio(ratio: float, total_params: int, block_params: float, rule: str) -> int:
    """Blocks of one decoder are equal in size, so a parameter ratio is a block count."""
    return round_count(ratio * total_params / block_params, rule)


def hidden_channels_to_remove(d: int, heads: int, want: float) -> int:
    """The channel count nearest ``want`` that keeps the width a multiple of ``heads`` (LlamaConfig refuses others)."""
    return min((c for c in range(d + 1) if (d - c) % heads == 0), key=lambda c: (abs(c - want), c))


def lowest(scores: list[float], k: int) -> list[int]:
    """The indices of the ``k`` lowest scores (ties: the lower index), in ascending index order."""
    return sorted(sorted(range(len(scores)), key=lambda j: (scores[j], j))[:k])
