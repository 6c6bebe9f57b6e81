"""Expert selection on mixture-of-experts layers: which experts, and which channels inside every expert, go.

The same count in every MoE layer (and, for channels, in every expert), because transformers reads one expert count
and one expert width from the config; which units go is per layer (per expert), lowest score first. Kept expert
widths stay multiples of 8 (transformers' grouped_mm experts kernel needs 16-byte-aligned rows).
"""

from __future__ import annotations

from typing import Any

from prunelab.stages.calibration.width import LayerGeometry
from prunelab.stages.selection.targets import lowest, round_count
from prunelab.stages.selection.width import WidthTargetError
from prunelab.stages.surgery.experts import EXPERT_WIDTH_MULTIPLE


def select_experts(
    scores: dict[str, list[dict[str, Any]]],
    geos: list[LayerGeometry],
    experts: Any | None,
    channels: Any | None,
) -> dict[int, dict[str, Any]]:
    """Per MoE layer ``{"experts": [...], "expert_channels": [[...] per expert]}``. ``scores[key]`` is the layers list
    of the criterion that scores ``key``; ``experts`` / ``channels`` are ``ExpertUnits`` (ratio, criterion) or None."""
    moe = [i for i, g in enumerate(geos) if g.experts]
    if not moe:
        raise WidthTargetError("experts / expert_channels: the model has no mixture-of-experts layers")
    out: dict[int, dict[str, Any]] = {i: {} for i in moe}
    if experts is not None:
        for i in moe:
            g, k = geos[i], round_count(experts.ratio * geos[i].experts)
            if k < 1:
                raise WidthTargetError(
                    f"experts.ratio={experts.ratio} removes less than one of {g.experts} experts; raise it"
                )
            if g.experts - k < g.top_k:
                raise WidthTargetError(
                    f"experts.ratio={experts.ratio} removes {k} of {g.experts} experts in layer {i}, "
                    f"leaving fewer than num_experts_per_tok = {g.top_k}; remove at most "
                    f"{g.experts - g.top_k}"
                )
            out[i]["experts"] = lowest(_layer(scores, "experts", i, experts.criterion), k)
    if channels is not None:
        for i in moe:
            g, k = geos[i], _channels_to_remove(channels.ratio, geos[i].expert_intermediate)
            if not 1 <= k < g.expert_intermediate:
                raise WidthTargetError(
                    f"expert_channels.ratio={channels.ratio} removes {k} of each expert's "
                    f"{g.expert_intermediate} channels; choose a ratio that removes some and keeps some"
                )
            per_expert = _layer(scores, "expert_channels", i, channels.criterion)
            out[i]["expert_channels"] = [lowest(s, k) for s in per_expert]
    return out


def _channels_to_remove(ratio: float, width: int) -> int:
    """round(ratio · width), adjusted so the kept width stays a multiple of 8 when it was one (transformers' grouped_mm
    experts kernel needs 16-byte-aligned expert rows; ``prunelab.stages.surgery.experts``)."""
    m = EXPERT_WIDTH_MULTIPLE
    if width % m:
        return round_count(ratio * width)
    return width - m * round(width * (1 - ratio) / m)


def _layer(scores: dict[str, list[dict[str, Any]]], key: str, i: int, criterion: str) -> Any:
    found = scores[key][i].get(key)
    if found is None:
        raise WidthTargetError(
            f"criterion {criterion!r} has no {key.replace('_', ' ')} scores for layer {i}; re-run the "
            "width score stage (it scores experts on mixture-of-experts models)"
        )
    return found
