"""Expert and expert-channel criteria of mixture-of-experts layers (``prunelab.stages.arch.moe``). Higher = more important.

Per MoE layer a result holds ``experts`` [E] and/or ``expert_channels`` [E][I] (one list per expert). Statistics are
routed-token sums from the calibration pass (``prunelab.stages.calibration.experts.ExpertStats``); weights come from the
adapter's fused expert tensors (gate_up [E, 2I, H], down [E, H, I]) and the router's weight [E, H].
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.stages.criteria.base import CriterionInputs, CriterionResult


def _moe_layers(inp: CriterionInputs) -> list[tuple[int, torch.nn.Module]]:
    ad = inp.adapter
    if not hasattr(ad, "expert_weights"):
        return []
    return [(i, layer) for i, layer in enumerate(ad.layers) if ad.is_moe(layer)]


def _stats(inp: CriterionInputs, i: int) -> Any:
    found = inp.stats.experts[i] if len(inp.stats.experts) > i else None
    if found is None or found.tokens == 0:
        raise ValueError(
            f"layer {i}: no routing statistics; expert criteria need a calibration pass (a `calibrate` "
            "stage before the width `score` stage)"
        )
    return found


def _only_experts(inp: CriterionInputs, score: Any) -> CriterionResult:
    layers: list[dict[str, list[float]]] = [{} for _ in range(inp.adapter.num_blocks)]
    for i, _layer in _moe_layers(inp):
        layers[i] = {"experts": score(_stats(inp, i)).tolist()}
    return CriterionResult(kind="width", layers=layers)


def expert_frequency_norm(inp: CriterionInputs) -> CriterionResult:
    """Router frequency × output norm: S_j = (|X_j| / |X|) · mean_{x ∈ X_j} ‖f_j(x)‖₂, where X_j are the calibration
    tokens whose router top-k includes expert j and f_j the expert's output (before the router weight): an expert
    that is rarely chosen, or adds little when it is, goes first."""
    return _only_experts(inp, lambda s: s.frequency() * s.mean_norm())


def reap(inp: CriterionInputs) -> CriterionResult:
    """REAP, Router-weighted Expert Activation Pruning (Lasby et al., 2025, arXiv 2510.13999), its saliency score:

        S_j = (1 / |X_j|) Σ_{x ∈ X_j} g_j(x) · ‖f_j(x)‖₂

    X_j: the calibration tokens routed to expert j (j in their top-k), g_j(x) the router weight the layer multiplies
    f_j(x) by (renormalised over the top-k where the family does), f_j(x) the expert's output. The mean is over
    routed tokens only, so REAP measures what an expert contributes when it is used, not how often."""
    return _only_experts(inp, lambda s: s.reap())


# ----------------------------------------------------------------------------- parts of the generic width criteria
def add_expert_scores(
    inp: CriterionInputs, layers: list[dict[str, list[float]]], how: str
) -> list[dict[str, list[float]]]:
    """Add ``experts`` / ``expert_channels`` to a width result's MoE layers: ``how`` = magnitude | random (both) or
    wanda_sp | flap (expert channels, from routed-token statistics)."""
    gen = torch.Generator().manual_seed(inp.seed + 1)
    for i, layer in _moe_layers(inp):
        gate_up, down = (w.detach().double() for w in inp.adapter.expert_weights(layer))
        n, inter = down.shape[0], down.shape[2]
        if how == "magnitude":  # L2 of everything the unit owns
            router = inp.adapter.router(layer).weight.detach().double()
            experts = (gate_up.pow(2).sum((1, 2)) + down.pow(2).sum((1, 2)) + router.pow(2).sum(1)).sqrt()
            channels = (gate_up.pow(2).sum(2).view(n, 2, inter).sum(1) + down.pow(2).sum(1)).sqrt()
            layers[i]["experts"] = experts.tolist()
        elif how == "random":
            layers[i]["experts"] = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
            channels = torch.rand(n, inter, generator=gen, dtype=torch.float64)
        else:
            channels = _activation_channels(_stats(inp, i), down, how)
        layers[i]["expert_channels"] = channels.tolist()
    return layers


def _activation_channels(stats: Any, down: torch.Tensor, how: str) -> torch.Tensor:
    """Wanda-sp: mean_i |W_ic| · ‖X_c‖₂; FLAP: Var(X_c) · ‖W_:,c‖²₂ standardised over the layer's expert channels —
    X the down projection's input of the expert on its routed tokens (an expert never routed to scores 0)."""
    rows = []
    for e, ch in enumerate(stats.channels):
        if ch.count == 0:
            rows.append(torch.zeros(down.shape[2], dtype=torch.float64))
        elif how == "wanda_sp":
            rows.append(down[e].abs().mean(0) * ch.sq_norm.sqrt())
        else:
            rows.append(ch.variance * down[e].pow(2).sum(0))
    out = torch.stack(rows)
    return out if how == "wanda_sp" else (out - out.mean()) / out.std().clamp_min(1e-12)
