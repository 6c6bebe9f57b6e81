"""Surgery on mixture-of-experts layers: remove experts (router rows + expert slices) and channels inside experts.

The members come from the adapter (``prunelab.stages.arch.moe``): parameters, not linears — axis "out" cuts rows of the
router weight, "expert" slice e of a fused [E, ·, ·] tensor, "expert_out" / "expert_in" rows / columns inside each
expert's slice. Channel indices are per expert, in the original expert numbering; every kept expert must keep the
same number of channels (a 3-D tensor has one width; a multiple of 8, which transformers' grouped_mm kernel
needs), and at least ``num_experts_per_tok`` experts must stay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunelab.stages.surgery.plan import PlanError

# transformers' default experts kernel (grouped_mm) needs every expert row 16-byte aligned: 8 channels in bf16
EXPERT_WIDTH_MULTIPLE = 8


def _set_param(layer: nn.Module, path: str, value: torch.Tensor) -> None:
    owner, name = path.rsplit(".", 1)
    old = layer.get_parameter(path)
    setattr(
        layer.get_submodule(owner), name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    )


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def prune_layer_experts(layer: nn.Module, experts: list[int], channels: list[list[int]], arch: Any) -> None:
    """Remove ``experts`` and, inside every kept expert e, the channels ``channels[e]`` of one MoE layer."""
    geo = arch.geometry(layer)
    n, inter = geo.experts, geo.expert_intermediate
    if not n:
        raise PlanError(
            f"this {arch.family} layer has no experts (a dense MLP layer): remove no experts from it"
        )
    gone = set(experts)
    if any(not 0 <= e < n for e in gone) or len(gone) != len(experts):
        raise PlanError(f"experts {experts} must be distinct indices in [0, {n})")
    keep = [e for e in range(n) if e not in gone]
    if len(keep) < geo.top_k:
        raise PlanError(
            f"removing {len(gone)} of {n} experts leaves {len(keep)}, fewer than num_experts_per_tok = "
            f"{geo.top_k}: a token could not be routed to that many experts; remove at most {n - geo.top_k}"
        )
    kept_channels = None
    if channels:
        if len(channels) != n:
            raise PlanError(
                f"expert_channels lists {len(channels)} experts; the layer has {n} (one list per expert)"
            )
        gone_channels = [set(ch) for ch in channels]
        kept_channels = [[c for c in range(inter) if c not in gone_channels[e]] for e in keep]
        widths = {len(k) for k in kept_channels}
        if len(widths) != 1 or 0 in widths or any(not 0 <= c < inter for ch in channels for c in ch):
            raise PlanError(
                f"every kept expert must keep the same, nonzero number of its {inter} channels "
                "(one fused tensor holds them all); give each expert as many distinct channels in range"
            )
        width = widths.pop()
        if width % EXPERT_WIDTH_MULTIPLE and not inter % EXPERT_WIDTH_MULTIPLE:
            raise PlanError(
                f"expert width {inter} → {width}: keep a multiple of {EXPERT_WIDTH_MULTIPLE} channels per "
                "expert — transformers' grouped_mm experts kernel needs 16-byte-aligned rows (bf16)"
            )
        inter = width
    for m in arch.members("expert"):
        p = layer.get_parameter(m.path).data
        _set_param(layer, m.path, p.index_select(0, _index(m.index(keep, geo), p.device)))
    if kept_channels is not None:
        for m in arch.members("expert_channel"):
            p = layer.get_parameter(m.path).data
            dim = 0 if m.axis == "expert_out" else 1
            _set_param(
                layer,
                m.path,
                torch.stack(
                    [
                        p[j].index_select(dim, _index(m.index(k, geo), p.device))
                        for j, k in enumerate(kept_channels)
                    ]
                ),
            )
    arch.set_experts(layer, len(keep), inter)
