"""OWL layer allocation (Yin et al., 2023, arXiv 2310.05175) and the linear ratio offsets it shares with AlphaPruning.

An allocation decides how much each layer loses; it is not a criterion (which decides which units go): both
OWL and AlphaPruning (``prunelab.stages.selection.alpha``) give per-layer offsets around the target ratio r that any
criterion's scores are then cut with (``prunelab.stages.selection.width.select_uniform``).
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.arch.base import INPUT_OF, STAT_KEYS


def owl_offsets(model: torch.nn.Module, sq_norm: dict[str, list[torch.Tensor]], layers: list[int], m: float, lam: float) -> list[float]:
    """OWL layer allocation (Yin et al., 2023, arXiv 2310.05175, Sec. 3.2), as a per-layer ratio offset.

    Layer outlier ratio D_ℓ = |{A_ij > M · mean(A)}| / |A| over the Wanda scores A_ij = |W_ij| · ‖X_j‖₂
    of all the layer's projections. Layers richer in outliers are pruned less: the layer ratio is
    r_ℓ = r − (a_ℓ − mean(a)),  a_ℓ = 2λ (D_ℓ − min D) / (max D − min D),  so r_ℓ ∈ [r − λ, r + λ]
    and the mean over the pruned layers stays r. Returns offsets for every layer (0 outside ``layers``).
    """
    ad = adapter_for(model)
    ratios = []
    for i in layers:
        layer = ad.layers[i]
        parts = []
        for role in ad.distinct_roles():
            lin, key = ad.linear(layer, role), STAT_KEYS[INPUT_OF[role]]
            parts.append((lin.weight.detach().float().abs() * sq_norm[key][i].float().sqrt()[None]).flatten())
        scores = torch.cat(parts)
        ratios.append((scores > m * scores.mean()).double().mean().item())
    # more outliers → pruned less: map −D_ℓ (equal to −(a_ℓ − mean a) after centring)
    return linear_offsets([-r for r in ratios], layers, ad.num_blocks, lam)


def linear_offsets(values: list[float], layers: list[int], num_layers: int, half_span: float) -> list[float]:
    """Per-layer ratio offsets linear in ``values`` (one per layer in ``layers``): the lowest value gets the lowest
    offset, the range is 2 × ``half_span``, the mean over ``layers`` is 0 (so the mean ratio stays r); layers
    outside ``layers`` get 0. Shared by OWL (values −D_ℓ) and AlphaPruning (values α_ℓ)."""
    v = torch.tensor(values, dtype=torch.float64)
    span = (v.max() - v.min()).item()
    mapped = torch.zeros_like(v) if span == 0 else (v - v.min()) / span * 2 * half_span
    out = [0.0] * num_layers
    for i, o in zip(layers, (mapped - mapped.mean()).tolist()):
        out[i] = o
    return out


def owl_allocation(model: torch.nn.Module, stats: dict[str, Any] | None, layers: list[int], cfg: Any) -> tuple[list[float], dict[str, Any]]:
    """The implementation registered for ``allocation: owl`` (``prunelab.stages.surgery.targets``): OWL's offsets."""
    if stats is None:
        raise ValueError("allocation: owl needs activation statistics from a width `score` stage")
    return owl_offsets(model, stats["sq_norm"], layers, cfg.m, cfg.lambda_), {}
