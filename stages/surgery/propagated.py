"""Compensation fitted on the pruned path (``pipeline: {type: sequential, propagate: pruned}``).

With ``propagate: dense`` each o_proj / down_proj that loses input channels S is re-fitted on the dense model's
inputs X (``prunelab.stages.surgery.compensation``): it repairs its own removal only, and the errors of the blocks
before it reach it unrepaired. Here the width plan (decided on the dense scores: pass 1) is applied block by
block (``prunelab.stages.calibration.walk_pruned``, pass 2), and each layer is re-fitted on X', its inputs in
the model whose earlier blocks — and, for down_proj, this block's attention — are already pruned and compensated.

The target (``target: dense``, the default) is the dense layer's output on the dense inputs, as in GPTAQ's
asymmetric calibration (Li et al., ICML 2025, arXiv 2504.02692; here for removed input channels rather than
quantisation), so the fit also absorbs the error carried in from earlier blocks. With the constant-1 channel
appended (bias solved too) and K the kept channels, the ridge-regularised least squares

    min over W', b':  ‖X'_K W'ᵀ + 1 b'ᵀ − (X Wᵀ + 1 bᵀ)‖²  +  λ ‖[W', b'] − [W_K, b]‖²

has the normal equations (H'_KK + λI) [W', b']ᵀ = C_K: [W, b]ᵀ + λ [W_K, b]ᵀ, i.e.

    [W', b'] = ([W, b] C_K:ᵀ + λ [W_K, b]) (H'_KK + λI)⁻¹,   H' = X'ᵀX' (pruned-path Gram),  C = X'ᵀX (cross term)

(all on the inputs augmented by 1; λ = damping × mean diag H', as ``compensation.damped``). When X' = X (block 0,
or nothing pruned before) C = H' and this is exactly the OBS solution of ``compensation.optimal_layer`` (a test
checks it). ``target: self`` fits the layer's own dense weights on the pruned-path inputs, target X' Wᵀ (C = H':
SparseGPT's symmetric form, which repairs this block's removal on the inputs it will see but not the inherited
error). ``compensation: bias`` (FLAP's) becomes b' = b + W x̄ − W_K x̄'_K (the mean of the same target, dense), or
b + W_S x̄'_S (self); without propagation both are FLAP's b + W_S x̄_S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prunelab.stages.arch import compensation_refusal
from prunelab.stages.calibration.propagate import BlockStep, walk_pruned
from prunelab.stages.surgery.apply import PlanError, prune_layer_width
from prunelab.stages.surgery.compensation import augmented_gram, optimal_layer


@dataclass
class PairedInputs:
    """Float64 sums over calibration tokens of one projection's inputs on both paths: X (dense model, dense inputs)
    and X' (pruned path), token by token (the cross term needs them paired)."""

    count: int = 0
    total: torch.Tensor | None = None  # Σ x'
    dense_total: torch.Tensor | None = None  # Σ x
    gram: torch.Tensor | None = None  # X'ᵀX'
    cross: torch.Tensor | None = None  # X'ᵀX (rows: pruned-path channels, columns: dense channels)
    dense_gram: torch.Tensor | None = None  # XᵀX, only when recorded (what propagate: dense would fit on)

    def add(self, dense: torch.Tensor, pruned: torch.Tensor, gram: bool, cross: bool, dense_gram: bool = False) -> None:
        x = dense.reshape(-1, dense.shape[-1]).double()
        xp = pruned.reshape(-1, pruned.shape[-1]).double()

        def plus(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
            return new if old is None else old + new

        self.total, self.dense_total = plus(self.total, xp.sum(0).cpu()), plus(self.dense_total, x.sum(0).cpu())
        if gram:
            self.gram = plus(self.gram, (xp.T @ xp).cpu())
        if cross:
            self.cross = plus(self.cross, (xp.T @ x).cpu())
        if dense_gram:
            self.dense_gram = plus(self.dense_gram, (x.T @ x).cpu())
        self.count += x.shape[0]


def asymmetric_layer(weight: torch.Tensor, bias: torch.Tensor | None, paired: PairedInputs, removed: list[int],
                     damping: float = 0.01, with_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kept columns [W', b'] fitted to the dense output on the pruned-path inputs (module docstring's formula)."""
    assert paired.gram is not None and paired.cross is not None and paired.total is not None
    d = weight.shape[1]
    keep = [j for j in range(d) if j not in set(removed)]
    w = weight.double().cpu()
    if with_bias:
        b0 = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double().cpu()
        w = torch.cat([w, b0[:, None]], dim=1)
        h = augmented_gram(paired.gram, paired.total, paired.count)
        c = augmented_gram(paired.cross, paired.total, paired.count)
        c[d, :d] = paired.dense_total.double()  # 1ᵀX: the dense inputs' sums (the column Σx' stays)
        keep = keep + [d]
    else:
        h, c = paired.gram.double(), paired.cross.double()
    lam = damping * torch.diagonal(h).mean().clamp_min(1e-12)  # from the whole H', as compensation.damped
    k = torch.tensor(keep, dtype=torch.long)
    rhs = w @ c[k].T + lam * w[:, k]  # [W, b] C_K:ᵀ + λ [W_K, b]
    h_kk = h[k][:, k] + lam * torch.eye(len(keep), dtype=h.dtype)
    new = torch.linalg.solve(h_kk, rhs.T).T  # H'_KK + λI is symmetric
    return (new[:, :-1], new[:, -1]) if with_bias else (new, None)


def asymmetric_bias(weight: torch.Tensor, paired: PairedInputs, removed: list[int], target: str) -> torch.Tensor:
    """The bias change: W x̄ − W_K x̄'_K (target dense) or W_S x̄'_S (target self)."""
    assert paired.total is not None and paired.dense_total is not None
    w = weight.double().cpu()
    keep = [j for j in range(w.shape[1]) if j not in set(removed)]
    mean_p = paired.total / paired.count
    if target == "self":
        return w[:, removed] @ mean_p[removed]
    return w @ (paired.dense_total / paired.count) - w[:, keep] @ mean_p[keep]


def _paired(step: BlockStep, role: str, gram: bool, cross: bool, dense_gram: bool = False) -> PairedInputs:
    """``role``'s inputs on both paths over every calibration batch (the dense block on x_i, the copy on x'_i)."""
    out = PairedInputs()
    for x, x_pruned in step.paired_inputs(lambda block: step.adapter.linear(block, role)):
        out.add(x, x_pruned, gram, cross, dense_gram)
    return out


def _install(lin: nn.Linear, weight: torch.Tensor | None, bias_change: torch.Tensor | None) -> None:
    """What surgery does with the side tensors (``replace_weights``, ``add_output_biases``), on the walk's copy."""
    if weight is not None:
        lin.weight.data.copy_(weight.to(lin.weight.device, lin.weight.dtype))
    if bias_change is not None:
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
        lin.bias.data += bias_change.to(lin.bias.device, lin.bias.dtype)


class PropagatedCompensation:
    """The per-block fit ``walk_pruned`` calls: prune block i's copy as the plan says — attention first, then the
    MLP — re-fitting o_proj / down_proj on the pruned-path inputs right before each is cut; the side tensors (named
    by parameter, as ``compensation.optimal_compensation`` names them) collect in ``side``."""

    def __init__(self, plan_layers: dict[int, dict[str, list[int]]], kind: str, damping: float = 0.01,
                 with_bias: bool = True, target: Literal["dense", "self"] = "dense",
                 record: dict[tuple[int, str], PairedInputs] | None = None) -> None:
        if kind not in ("optimal", "bias"):
            raise ValueError(f"propagate: pruned re-fits compensation: bias or optimal; got compensation: {kind}")
        self.layers, self.kind, self.damping = plan_layers, kind, damping
        self.with_bias, self.target = with_bias, target
        self.record = record  # (block, role) → its paired statistics, when the caller wants to inspect them
        self.side: dict[str, torch.Tensor] = {}

    def __call__(self, step: BlockStep) -> None:
        rem = self.layers.get(step.index)
        if not rem or not any(rem.get(k) for k in ("q_heads", "kv_heads", "mlp")):
            return
        arch = type(step.adapter)
        hd = step.adapter.attention(step.dense).head_dim
        parts = (("o", {"q_heads": rem.get("q_heads", []), "kv_heads": rem.get("kv_heads", []), "mlp": []},
                  [h * hd + j for h in rem.get("q_heads", []) for j in range(hd)]),
                 ("down", {"q_heads": [], "kv_heads": [], "mlp": rem.get("mlp", [])}, list(rem.get("mlp", []))))
        for role, units, cols in parts:
            if not any(units.values()):
                continue
            fitted = self._fit(step, role, cols) if cols else None
            prune_layer_width(step.pruned, units, arch)
            if fitted is not None:
                weight, bias_change = fitted
                lin = step.adapter.linear(step.pruned, role)
                _install(lin, weight, bias_change)
                if weight is not None:
                    self.side[step.adapter.param_name(step.index, role, "weight")] = weight
                if bias_change is not None:
                    self.side[step.adapter.param_name(step.index, role, "bias")] = bias_change

    def _fit(self, step: BlockStep, role: str, cols: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(kept compensated weight, bias change) of ``role`` in block ``step.index``, in the layer's dtype."""
        optimal = self.kind == "optimal"
        paired = _paired(step, role, gram=optimal, cross=optimal and self.target == "dense",
                         dense_gram=self.record is not None)  # recorded: what propagate: dense would fit on
        if self.record is not None:
            self.record[(step.index, role)] = paired
        lin = step.adapter.linear(step.dense, role)
        dtype = lin.weight.dtype
        if not optimal:
            return None, asymmetric_bias(lin.weight.detach(), paired, cols, self.target).to(dtype)
        bias = None if lin.bias is None else lin.bias.detach()
        if self.target == "dense":
            w, b = asymmetric_layer(lin.weight.detach(), bias, paired, cols, self.damping, self.with_bias)
        else:
            assert paired.gram is not None and paired.total is not None
            w, b = optimal_layer(lin.weight.detach().cpu(), None if bias is None else bias.cpu(), paired.gram,
                                 paired.total, paired.count, cols, self.damping, self.with_bias)
        if b is None:
            return w.to(dtype), None
        old = torch.zeros_like(b) if bias is None else bias.double().cpu()
        return w.to(dtype), (b - old).to(dtype)


def propagated_compensation(model: nn.Module, calibration: torch.Tensor, plan_layers: dict[int, dict[str, list[int]]],
                            compensation: Any, target: Literal["dense", "self"] = "dense", batch_size: int = 1,
                            progress: bool = True, settings: Any = None, weights: Any = None,
                            record: dict[tuple[int, str], PairedInputs] | None = None) -> dict[str, torch.Tensor]:
    """Side tensors of ``compensation`` (the recipe's bias / optimal settings) for ``plan_layers`` fitted with pruned
    propagation (pass 2 of ``propagate: pruned``). The model is left as it was; surgery applies plan and side."""
    kind = compensation.type
    with_bias = kind == "bias" or bool(getattr(compensation, "bias", False))
    refusal = compensation_refusal(model.config.model_type) if with_bias else None
    if refusal:
        raise PlanError(refusal)
    fit = PropagatedCompensation(plan_layers, kind, getattr(compensation, "damping", 0.01), with_bias, target, record)
    walk_pruned(model, calibration, fit, batch_size, progress, settings, weights)
    return fit.side
