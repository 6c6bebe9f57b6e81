"""What one calibration pass leaves behind: ``CalibrationStats``, and the one gradient accumulation.

Criteria declare what they need by name; each name is one registered observer (``prunelab.stages.calibration.needs``,
implemented in ``prunelab.stages.calibration.observers``), and a pipeline (``full``, ``sequential``) drives the
calibration data past the observers the criteria need. Who fills what:

- ``boundary``, ``sublayers``, ``removal_nll``: observers of the block-boundary states;
- ``activations``, ``hessian``: input observers on the projections (``ChannelStats``, expert routing);
- ``grad``, ``fisher``: one forward+backward per batch, summed by ``accumulate_gradients`` below — the sums of
  ∂L_b/∂w (and of (∂L_b/∂w)²) over batches b, in float32. Depth Taylor+ reads the sums (``grad_sum``), LLM-Pruner's
  width criteria the means (``grad_mean``, ``fisher``: the sums over the number of batches, divided on access so
  no second copy of the model's gradients is held). Only decoder-layer weights are kept, unless ``hidden`` (hidden
  channels also own the embeddings, the norms and the head);
- ``calibration``: nothing to collect; the criterion runs its own passes (SLEB's later rounds, LaCo).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.stages.arch import adapter_class
from prunelab.stages.arch.base import STAT_KEYS
from prunelab.stages.calibration.channels import ChannelStats

class _Averaged(Mapping[str, torch.Tensor]):
    """A read-only view of per-parameter sums divided by a count, computed per access."""

    def __init__(self, sums: dict[str, torch.Tensor], count: int) -> None:
        self._sums, self._count = sums, count

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._sums[name] / self._count

    def __contains__(self, name: object) -> bool:
        return name in self._sums

    def __iter__(self) -> Iterator[str]:
        return iter(self._sums)

    def __len__(self) -> int:
        return len(self._sums)


@dataclass
class CalibrationStats:
    """Every statistic a criterion may read; a field stays empty unless a criterion asked for it."""

    num_blocks: int = 0
    # boundary (ShortGPT, Gromov et al.)
    bi_cos_sum: torch.Tensor | None = None  # [L]   Σ_t cos(x_i, x_{i+1})
    bi_tokens: int = 0
    angular_sum: torch.Tensor | None = None  # [L+1, L+1] Σ_samples arccos(cos_T)/π, upper triangle
    angular_samples: int = 0
    # sublayers (He et al., arXiv 2406.15786): Σ_t cos(X, Y) of each layer's attention [:, 0] and MLP [:, 1] sublayer,
    # X the residual stream entering the sublayer, Y the one leaving it
    sublayer_cos_sum: torch.Tensor | None = None  # [L, 2]
    sublayer_tokens: int = 0
    # removal_nll (Shortened LLaMA PPL, SLEB)
    removal_nll: torch.Tensor | None = None  # [L] Σ NLL with block i removed
    dense_nll: float = 0.0
    nll_tokens: int = 0
    # grad, fisher (Taylor criteria)
    grad_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_b ∂L_b/∂w
    grad_sq_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # Σ_b (∂L_b/∂w)²
    grad_batches: int = 0
    # activations, hessian: inputs of the attention output, MLP output, q/k/v and gate/up projections, one
    # ChannelStats per layer, keyed by the slot names of stages.arch.base.STAT_KEYS (also readable as attributes)
    inputs: dict[str, list[ChannelStats]] = field(default_factory=dict)
    # experts: routing statistics per MoE layer (None for dense layers; stages.calibration.experts.ExpertStats)
    experts: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    offloaded_bytes: int = 0  # sequential pipeline: peak boundary-state bytes memory-mapped to disk

    def __getattr__(self, name: str) -> list[ChannelStats]:
        inputs = self.__dict__.get("inputs")
        if inputs is not None and name in STAT_KEYS.values():
            return inputs.get(name, [])
        raise AttributeError(name)

    @property
    def grad_mean(self) -> Mapping[str, torch.Tensor]:
        """(1/B) Σ_b ∂L_b/∂w per parameter name."""
        return _Averaged(self.grad_sum, self.grad_batches)

    @property
    def fisher(self) -> Mapping[str, torch.Tensor]:
        """(1/B) Σ_b (∂L_b/∂w)² per parameter name (the empirical Fisher diagonal)."""
        return _Averaged(self.grad_sq_sum, self.grad_batches)


def accumulate_gradients(model: torch.nn.Module, ids: torch.Tensor, stats: CalibrationStats, squares: bool = False,
                         every_parameter: bool = False) -> None:
    """One forward+backward of the calibration loss on ``ids``, added to the sums (and squared sums) of ``stats``."""
    adapter = adapter_class(model.config.model_type)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        ids = ids.to(next(model.parameters()).device)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for name, p in model.named_parameters():
        if p.grad is None or (not adapter.is_block_param(name) and not every_parameter):
            continue
        g = p.grad.detach().float()
        stats.grad_sum[name] = stats.grad_sum[name] + g if name in stats.grad_sum else g.clone()
        if squares:
            sq = g * g
            stats.grad_sq_sum[name] = stats.grad_sq_sum[name] + sq if name in stats.grad_sq_sum else sq
    stats.grad_batches += 1
    model.zero_grad(set_to_none=True)
