"""AlphaPruning layer allocation (Lu et al., NeurIPS 2024, arXiv 2410.10912): heavy-tailed self-regularization
theory says a weight matrix whose eigenspectrum has a heavier power-law tail (lower α) has learned more
structure, so its layer should be pruned LESS. Data-free: only the weights are read.

Per weight matrix W, the empirical spectral density (ESD) is the eigenvalues λ of WᵀW, i.e. the squared
singular values. The tail exponent is fitted with the Hill estimator that AlphaPruning takes from
WeightWatcher (``PL_Alpha_Hill``, ``fix_fingers="xmin_mid"``): with λ sorted ascending and the tail starting
at the median, i = ⌊N/2⌋, n = N − i,

    α̂ = 1 + n / Σ_{j ≥ i} ln(λ_j / λ_i)                          (Hill, 1975; AlphaPruning Sec. 3.2)

A layer's α is the mean over its projections. Layer ratios are a linear map of α (the paper's
η(α) = (α − α_min)/(α_max − α_min) · (s₂ − s₁) + s₁, Eq. 5), here into [r − ε, r + ε] and shifted so that
the mean over the pruned layers is exactly r; the bisection in ``select_uniform`` then moves r itself
so the parameter target is met.
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.selection.owl import linear_offsets


def esd(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of WᵀW (= squared singular values of W), ascending, float64.

    Computed as ``eigvalsh`` of the smaller Gram matrix (WᵀW or WWᵀ share their nonzero eigenvalues):
    an order of magnitude faster on CPU than an SVD, and exact in float64.
    """
    w = weight.detach().double()
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return torch.linalg.eigvalsh(gram).clamp_min(0)


def hill_alpha(eigs: torch.Tensor) -> float:
    """Hill estimate of the power-law exponent of the tail above the median eigenvalue (see module doc)."""
    lam = torch.sort(eigs.double()[eigs > 0]).values
    n_all = lam.numel()
    if n_all < 4:
        raise ValueError(f"need at least 4 positive eigenvalues to fit a tail, got {n_all}")
    i = n_all // 2
    tail = lam[i:]
    denom = torch.log(tail / lam[i]).sum().item()
    if denom <= 0:
        return float("inf")  # a flat tail: no power law, the lightest possible
    return 1.0 + tail.numel() / denom


def layer_alphas(model: torch.nn.Module, roles: tuple[str, ...] | None = None) -> list[float]:
    """Mean Hill α over each decoder layer's weight matrices (the family adapter's linears of ``roles``; default:
    every distinct linear, a fused one once)."""
    ad = adapter_for(model)
    roles = roles or tuple(ad.distinct_roles())
    out = []
    for layer in ad.layers:
        vals = [hill_alpha(esd(ad.linear(layer, role).weight)) for role in roles]
        out.append(sum(vals) / len(vals))
    return out


def alpha_offsets(alphas: list[float], layers: list[int], epsilon: float) -> list[float]:
    """Per-layer ratio offsets from α: lowest α → r − ε, highest α → r + ε, mean over ``layers`` zero.

    Offsets for layers outside ``layers`` are 0 (they are not pruned).
    """
    return linear_offsets([alphas[i] for i in layers], layers, len(alphas), epsilon)


def alpha_allocation(model: torch.nn.Module, stats: Any, layers: list[int], cfg: Any) -> tuple[list[float], dict[str, Any]]:
    """The implementation registered for ``allocation: alpha`` (``prunelab.stages.surgery.targets``): AlphaPruning's
    offsets, with each layer's α recorded in the plan (``layer_alpha``)."""
    alphas = layer_alphas(model)
    return alpha_offsets(alphas, layers, cfg.epsilon), {"layer_alpha": alphas}
