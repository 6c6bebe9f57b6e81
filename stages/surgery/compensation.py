"""Compensation after removing input channels of a linear layer (pure maths; surgery applies the result).

Width pruning removes input channels S of ``o_proj`` (the columns of dropped heads) and ``down_proj``
(dropped MLP channels). The layer's output then loses W[:, S] X_S. Two repairs:

- ``bias`` — FLAP (An et al., 2024, arXiv 2312.11983, Eq. 8): b' = b + W[:, S] · X̄_S, the removed channels'
  mean contribution (``bias_compensation``);
- ``optimal`` — the closed-form multi-weight removal of "Pruning Foundation Models for High Accuracy
  without Retraining" (Zhao et al., 2024, arXiv 2410.15567, Sec. 3, code piuzha/APT), which is Optimal
  Brain Surgeon for a set of weights: with H = XᵀX + λI over calibration inputs X,

      δW = − W[:, S] · ((H⁻¹)[S, S])⁻¹ · (H⁻¹)[S, :]                            (OBS, Hassibi & Stork 1993)

  W + δW is zero on S and minimises ‖W Xᵀ − W' X_Kᵀ‖² over the kept columns K (the same solution as the
  least squares W' = W H[:, K] H[K, K]⁻¹; a test checks both forms agree).

With ``with_bias`` the input is augmented by a constant 1 (H gains the row/column Σx and N), so the bias
is optimised together with the kept weights: FLAP's bias-only repair is then one feasible point of the
same problem, and the optimal one is never worse on the calibration data (up to the dampening λ).
Computed in float64. ``bias_compensation`` and ``optimal_compensation`` apply these to every o_proj / down_proj a
width plan shrinks and return side tensors named by parameter, which surgery adds after slicing.
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.arch.base import STAT_KEYS


def damped(h: torch.Tensor, damping: float) -> torch.Tensor:
    """H + λI with λ = damping × mean(diag H) (SparseGPT's relative dampening; keeps H invertible)."""
    lam = damping * torch.diagonal(h).mean().clamp_min(1e-12)
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def obs_remove(weight: torch.Tensor, hessian: torch.Tensor, removed: list[int], damping: float = 0.01) -> torch.Tensor:
    """W + δW (float64, full width; zero on ``removed``) for removing input channels ``removed``."""
    w = weight.double()
    if not removed:
        return w.clone()
    hinv = torch.linalg.inv(damped(hessian.double(), damping))
    s = torch.tensor(removed, dtype=torch.long)
    # δW = −W_S (H⁻¹_SS)⁻¹ H⁻¹_S: ; solve instead of a second explicit inverse
    coef = torch.linalg.solve(hinv[s][:, s], hinv[s])  # (H⁻¹_SS)⁻¹ H⁻¹_S:
    out = w - w[:, s] @ coef
    out[:, s] = 0.0
    return out


def augmented_gram(gram: torch.Tensor, total: torch.Tensor, count: int) -> torch.Tensor:
    """[[XᵀX, Xᵀ1], [1ᵀX, N]]: the Gram matrix of the inputs with a constant-1 channel appended."""
    d = gram.shape[0]
    h = torch.empty(d + 1, d + 1, dtype=torch.float64)
    h[:d, :d] = gram.double()
    h[:d, d] = total.double()
    h[d, :d] = total.double()
    h[d, d] = float(count)
    return h


def optimal_layer(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, total: torch.Tensor, count: int,
                  removed: list[int], damping: float = 0.01, with_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kept columns of the compensated weight (out × kept) and, with ``with_bias``, the new bias."""
    keep = [j for j in range(weight.shape[1]) if j not in set(removed)]
    if not with_bias:
        return obs_remove(weight, gram, removed, damping)[:, keep], None
    b0 = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    w_aug = torch.cat([weight.double(), b0[:, None]], dim=1)
    new = obs_remove(w_aug, augmented_gram(gram, total, count), removed, damping)
    return new[:, keep], new[:, -1]


def output_error(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, new_weight: torch.Tensor,
                 new_bias: torch.Tensor | None, keep: list[int]) -> float:
    """‖(X Wᵀ + b) − (X_K W'ᵀ + b')‖²_F: how far the pruned layer's output is from the dense one."""
    ref = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    got = x.double()[:, keep] @ new_weight.double().T + (0 if new_bias is None else new_bias.double())
    return float(((ref - got) ** 2).sum())


# ----------------------------------------------------------------------------- on a model, from a width plan
def removed_inputs(model: torch.nn.Module, plan_layers: dict[int, dict[str, list[int]]]) -> list[tuple[int, str, str, torch.nn.Linear, list[int]]]:
    """(layer, parameter prefix, statistics key, linear, removed input channels) for every o_proj / down_proj that loses
    inputs: the removed query heads' columns of o_proj, the removed MLP channels of down_proj. What compensation repairs."""
    out = []
    ad = adapter_for(model)
    for i, rem in plan_layers.items():
        layer = ad.layers[i]
        hd = ad.attention(layer).head_dim
        cols = [h * hd + d for h in rem["q_heads"] for d in range(hd)]
        for role, idx in (("o", cols), ("down", rem["mlp"])):
            if idx:
                out.append((i, ad.param_name(i, role, ""), STAT_KEYS[role], ad.linear(layer, role), idx))
    return out


def bias_compensation(model: torch.nn.Module, plan_layers: dict[int, dict[str, list[int]]], means: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """FLAP's baseline bias (arXiv 2312.11983, Eq. 8): b' = b + W[:, S] · X̄[S] for removed input channels S.

    A removed channel's average contribution is folded into the output bias, so on average the
    layer's output is unchanged. Returned as side tensors named by parameter.
    """
    side: dict[str, torch.Tensor] = {}
    for i, name, key, lin, idx in removed_inputs(model, plan_layers):
        shift = lin.weight.detach().double()[:, idx] @ means[key][i].double()[idx]
        side[f"{name}bias"] = shift.to(lin.weight.dtype)
    return side


def optimal_compensation(model: torch.nn.Module, plan_layers: dict[int, dict[str, list[int]]], grams: dict[str, list[Any]],
                         damping: float, with_bias: bool) -> dict[str, torch.Tensor]:
    """APT / OBS multi-weight removal (``optimal_layer``) for o_proj and down_proj of every pruned layer.

    Returns side tensors: the compensated kept columns as ``<param>.weight`` (shape after slicing) and, with
    ``with_bias``, the bias change as ``<param>.bias`` (added to the existing bias, like FLAP's).
    """
    side: dict[str, torch.Tensor] = {}
    for i, name, key, lin, idx in removed_inputs(model, plan_layers):
        gram, total, count = grams[key][i]
        w, b = optimal_layer(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), gram, total,
                             count, idx, damping, with_bias)
        side[f"{name}weight"] = w.to(lin.weight.dtype)
        if b is not None:
            old = torch.zeros_like(b) if lin.bias is None else lin.bias.detach().double()
            side[f"{name}bias"] = (b - old).to(lin.weight.dtype)
    return side


def compensate_bias(model: torch.nn.Module, plan_layers: dict[int, dict[str, list[int]]], stats: dict[str, Any] | None,
                    cfg: Any) -> dict[str, torch.Tensor]:
    """The implementation registered for ``compensation: bias`` (``prunelab.stages.surgery.targets``)."""
    if stats is None:
        raise ValueError("compensation: bias needs activation means from a width `score` stage")
    return bias_compensation(model, plan_layers, stats)


def compensate_optimal(model: torch.nn.Module, plan_layers: dict[int, dict[str, list[int]]], stats: dict[str, Any] | None,
                       cfg: Any) -> dict[str, torch.Tensor]:
    """The implementation registered for ``compensation: optimal`` (``prunelab.stages.surgery.targets``)."""
    if stats is None or "gram" not in stats:
        raise ValueError("compensation: optimal needs XᵀX of the attention/MLP output projections' inputs from the width "
                         "`score` stage (it collects them when a later prune stage asks for optimal compensation)")
    return optimal_compensation(model, plan_layers, stats["gram"], cfg.damping, cfg.bias)
