"""Width units and the observers of their inputs.

Units of a Llama-layout layer (``head_dim`` never changes):
- KV group g: K head g, V head g, the ``n_q / n_kv`` query heads that share them, and those heads'
  ``o_proj`` input columns;
- query head h (inside its group): its ``q_proj`` rows and ``o_proj`` columns — removed uniformly
  across groups so ``num_attention_heads`` stays a multiple of ``num_key_value_heads``;
- MLP channel c: ``gate_proj`` row c, ``up_proj`` row c, ``down_proj`` column c.

Observers (forward pre-hooks on ``o_proj`` and ``down_proj``, whose inputs are exactly the channels
those units own, and on ``q_proj`` and ``gate_proj`` for OWL's outlier ratios): per input channel, the
mean (FLAP's bias compensation), the sample variance (FLAP's fluctuation) and the squared norm
(Wanda-sp), accumulated in float64; with the ``hessian`` statistic also XᵀX of o_proj/down_proj inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from prunelab.stages.arch import adapter_for, layer_adapter
from prunelab.stages.arch.base import OBSERVED_ROLES, STAT_KEYS, LayerGeometry

if TYPE_CHECKING:
    from prunelab.stages.calibration.stats import CalibrationStats

__all__ = ["OBSERVED", "ChannelStats", "LayerGeometry", "geometry", "observing_inputs", "start_input_observers", "summary_tensors"]

OBSERVED = tuple(STAT_KEYS[r] for r in OBSERVED_ROLES)  # CalibrationStats fields, one ChannelStats per layer
COMPENSATED = (STAT_KEYS["o"], STAT_KEYS["down"])  # slots whose XᵀX optimal compensation needs


def geometry(layer: torch.nn.Module) -> LayerGeometry:
    """A lone layer's geometry, as its family's adapter reads it; with a model at hand ask ``adapter_for(model)``."""
    return layer_adapter(layer).geometry(layer)


@dataclass
class ChannelStats:
    """Running float64 sums over calibration tokens for one linear layer's input channels."""

    count: int = 0
    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None
    keep_gram: bool = False
    gram: torch.Tensor | None = None  # Σ x xᵀ (optimal compensation's H), only when keep_gram

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        s, sq = x.sum(0), (x * x).sum(0)
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        if self.keep_gram:
            g = x.T @ x
            self.gram = g if self.gram is None else self.gram + g
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor | None:
        """None when nothing was observed (a MoE layer has no dense MLP input)."""
        return None if self.total is None else self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per channel: (Σx² − N·x̄²) / (N − 1)."""
        return ((self.total_sq - self.count * self.mean**2) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """‖X_j‖² over all calibration tokens."""
        return self.total_sq


def start_input_observers(model: torch.nn.Module, stats: CalibrationStats, gram: bool) -> None:
    """One ``ChannelStats`` per layer and observed projection; XᵀX for o_proj/down_proj inputs when ``gram``; on
    mixture-of-experts models the routing statistics of every MoE layer (``prunelab.stages.calibration.experts``)."""
    from prunelab.stages.calibration.experts import start_expert_observers

    adapter = adapter_for(model)
    for name in OBSERVED:
        stats.inputs[name] = [ChannelStats(keep_gram=gram and name in COMPENSATED) for _ in range(adapter.num_blocks)]
    stats.experts = start_expert_observers(adapter)


@contextmanager
def observing_inputs(model: torch.nn.Module, stats: CalibrationStats) -> Iterator[None]:
    """Forward pre-hooks recording the projections' inputs into ``stats`` while the block runs."""
    handles: list[Any] = []
    try:
        from prunelab.stages.calibration.experts import expert_hooks

        adapter = adapter_for(model)
        for i, layer in enumerate(adapter.layers):
            for role in OBSERVED_ROLES:
                if role not in adapter.LINEARS:  # MoE layers: no dense MLP linear (experts are observed below)
                    continue
                lin = adapter.linear(layer, role)
                handles.append(lin.register_forward_pre_hook(_recorder(stats.inputs[STAT_KEYS[role]][i])))
        handles += expert_hooks(adapter, stats.experts)
        yield
    finally:
        for h in handles:
            h.remove()


def _recorder(target: ChannelStats) -> Any:
    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        target.add(args[0])

    return hook


def summary_tensors(stats: CalibrationStats) -> dict[str, Any]:
    """What selection needs later (and ``--resume`` restores): input means and squared norms per layer,
    and with the "hessian" statistic the float64 Gram matrices, sums and token counts of o_proj/down_proj inputs."""
    out: dict[str, Any] = {name: [_float(s.mean) for s in stats.inputs[name]] for name in COMPENSATED}
    out["sq_norm"] = {STAT_KEYS[r]: [_float(s.sq_norm) for s in stats.inputs[STAT_KEYS[r]]] for r in ("q", "gate", "o", "down")}
    first = stats.inputs.get(COMPENSATED[0])
    if first and first[0].gram is not None:
        out["gram"] = {name: [(s.gram, s.total, s.count) for s in stats.inputs[name]] for name in COMPENSATED}
    return out


def _float(t: torch.Tensor | None) -> torch.Tensor:
    """Float32, or an empty tensor for a slot nothing was observed in (MoE layers' dense MLP slots)."""
    return torch.zeros(0) if t is None else t.float()
