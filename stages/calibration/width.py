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

if TYPE_CHECKING:
    from stages.calibration.stats import CalibrationStats

OBSERVED = ("o_proj", "down_proj", "q_proj", "gate_proj")  # CalibrationStats fields, one ChannelStats per layer


@dataclass(frozen=True)
class LayerGeometry:
    n_q: int
    n_kv: int
    head_dim: int
    intermediate: int
    hidden: int

    @property
    def q_per_group(self) -> int:
        return self.n_q // self.n_kv

    def params_per_kv_group(self) -> int:
        """q rows + k rows + v rows + o columns of one group (biases ignored)."""
        return self.hidden * self.head_dim * (2 * self.q_per_group + 2)

    def params_per_q_head(self) -> int:
        return 2 * self.hidden * self.head_dim

    def params_per_mlp_channel(self) -> int:
        return 3 * self.hidden


def geometry(layer: torch.nn.Module) -> LayerGeometry:
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    return LayerGeometry(
        n_q=attn.q_proj.out_features // head_dim,
        n_kv=attn.k_proj.out_features // head_dim,
        head_dim=head_dim,
        intermediate=mlp.gate_proj.out_features,
        hidden=attn.q_proj.in_features,
    )


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
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per channel: (Σx² − N·x̄²) / (N − 1)."""
        return ((self.total_sq - self.count * self.mean**2) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """‖X_j‖² over all calibration tokens."""
        return self.total_sq


def start_input_observers(model: torch.nn.Module, stats: CalibrationStats, gram: bool) -> None:
    """One ``ChannelStats`` per layer and observed projection; XᵀX for o_proj/down_proj inputs when ``gram``."""
    for name in OBSERVED:
        keep = gram and name in ("o_proj", "down_proj")
        setattr(stats, name, [ChannelStats(keep_gram=keep) for _ in model.model.layers])


@contextmanager
def observing_inputs(model: torch.nn.Module, stats: CalibrationStats) -> Iterator[None]:
    """Forward pre-hooks recording the projections' inputs into ``stats`` while the block runs."""
    handles: list[Any] = []
    try:
        for i, layer in enumerate(model.model.layers):
            for lin, name in ((layer.self_attn.o_proj, "o_proj"), (layer.mlp.down_proj, "down_proj"),
                              (layer.self_attn.q_proj, "q_proj"), (layer.mlp.gate_proj, "gate_proj")):
                handles.append(lin.register_forward_pre_hook(_recorder(getattr(stats, name)[i])))
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
    out: dict[str, Any] = {
        "o_proj": [s.mean.float() for s in stats.o_proj],
        "down_proj": [s.mean.float() for s in stats.down_proj],
        "sq_norm": {name: [s.sq_norm.float() for s in getattr(stats, name)] for name in ("q_proj", "gate_proj", "o_proj", "down_proj")},
    }
    if stats.o_proj and stats.o_proj[0].gram is not None:
        out["gram"] = {name: [(s.gram, s.total, s.count) for s in getattr(stats, name)] for name in ("o_proj", "down_proj")}
    return out
