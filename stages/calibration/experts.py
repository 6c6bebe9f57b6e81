"""Routing statistics of mixture-of-experts layers, observed on the calibration pass (with the width observers).

A forward hook on a layer's experts module sees the tokens, the top-k expert indices and their router weights;
for each expert it re-runs the expert on the tokens routed to it (inside the hook, without gradients) and adds:
the routed-token count, Σ gate weight, Σ ‖f_e(x)‖₂, Σ g_e(x)·‖f_e(x)‖₂ (REAP's numerator) and the input moments of
the expert's down projection (per channel, as ``ChannelStats``: what Wanda-sp and FLAP read for expert channels).
Re-running doubles the experts' cost on the pass, and keeps every statistic exact on the routed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.stages.calibration.channels import ChannelStats


@dataclass
class ExpertStats:
    """Float64 sums over calibration tokens for one MoE layer (E experts)."""

    experts: int
    tokens: int = 0
    count: torch.Tensor = field(init=False)
    gate_sum: torch.Tensor = field(init=False)
    norm_sum: torch.Tensor = field(init=False)
    reap_sum: torch.Tensor = field(init=False)
    channels: list[ChannelStats] = field(init=False)

    def __post_init__(self) -> None:
        self.count, self.gate_sum, self.norm_sum, self.reap_sum = (
            torch.zeros(self.experts, dtype=torch.float64) for _ in range(4)
        )
        self.channels = [ChannelStats() for _ in range(self.experts)]

    def frequency(self) -> torch.Tensor:
        """Share of tokens whose top-k includes each expert."""
        return self.count / max(self.tokens, 1)

    def mean_norm(self) -> torch.Tensor:
        """Mean ‖f_e(x)‖₂ over the tokens routed to e (0 when none were)."""
        return self.norm_sum / self.count.clamp_min(1)

    def reap(self) -> torch.Tensor:
        """Mean g_e(x)·‖f_e(x)‖₂ over the tokens routed to e (0 when none were)."""
        return self.reap_sum / self.count.clamp_min(1)


def start_expert_observers(adapter: Any) -> list[ExpertStats | None]:
    """One ``ExpertStats`` per MoE layer (None for dense layers), or an empty list for a dense family."""
    if not hasattr(adapter, "expert_weights"):
        return []
    return [
        ExpertStats(adapter.geometry(layer).experts) if adapter.is_moe(layer) else None
        for layer in adapter.layers
    ]


def expert_hook(adapter: Any, layer: torch.nn.Module, target: ExpertStats | None) -> list[Any]:
    """The forward hook filling ``target`` from ``layer``'s experts (none for a dense layer); remove the handles
    when done. Per layer, so the sequential pipeline hooks only the block it holds."""
    if target is None:
        return []
    return [adapter.experts(layer).register_forward_hook(_recorder(adapter, layer, target))]


def _recorder(adapter: Any, layer: torch.nn.Module, target: ExpertStats) -> Any:
    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> None:
        hidden, index, weights = args[:3]
        with torch.no_grad():
            x = hidden.detach().reshape(-1, hidden.shape[-1])
            target.tokens += x.shape[0]
            for e in index.unique().tolist():
                if not 0 <= e < target.experts:
                    continue
                token, slot = torch.where(index == e)
                h, out = adapter.expert_ffn(layer, e, x[token])
                norm, gate = out.double().norm(dim=-1), weights[token, slot].double()
                target.count[e] += token.numel()
                target.gate_sum[e] += gate.sum()
                target.norm_sum[e] += norm.sum()
                target.reap_sum[e] += (gate * norm).sum()
                target.channels[e].add(h)

    return hook
