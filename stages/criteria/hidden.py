"""Hidden-channel importance: LLM-Pruner's "channel" strategy (Ma et al., 2023, arXiv 2305.11627, Sec. 3.1).

A hidden (residual-stream) channel c couples, across the WHOLE model: column c of the token embedding
(and of an untied LM head), entry c of every RMSNorm weight, input column c of every q/k/v/gate/up
projection and output row c (plus bias entry) of every o_proj/down_proj. Removing it shrinks
``hidden_size``; ``head_dim`` never changes.

The group importance is the same element-wise estimate as for heads and MLP channels, reduced over
the group's members with LLM-Pruner's aggregation (sum / mean / max / prod):

- magnitude:        I(G) = ‖W_G‖₂               (L1: Σ|w|)
- taylor:           I(w) = |∂L/∂w · w|                           (Eq. 4, element1)
- taylor_element2:  I(w) = |∂L/∂w · w − ½ w F w|,  F = mean (∂L_n/∂w)²   (Eq. 5, element2)
- taylor_vector:    I(W_i) = |Σ_k ∂L/∂W_ik · W_ik| per member vector       (Eq. 3)
- random:           i.i.d. uniform from the seed.

Wanda-sp and FLAP score the *inputs* of o_proj/down_proj; they have no definition for hidden channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.criteria.base import CriterionInputs
from prunelab.stages.criteria.registry import CRITERIA
from prunelab.stages.criteria.width import reduce_parts, reduction


def hidden_members(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(parameter name, tensor, hidden axis) of every member of the hidden-channel group; tied weights once."""
    return adapter_for(model).hidden_members()


def params_per_hidden_channel(model: torch.nn.Module) -> int:
    """Parameters one hidden channel owns (what removing it saves): the product of each member's other dims."""
    return sum(t.numel() // t.shape[axis] for _, t, axis in hidden_members(model))


def _per_channel(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum of an element-wise importance over everything but the hidden axis."""
    if t.dim() == 1:
        return t
    return t.sum(0) if axis == 1 else t.sum(1)


def hidden_channel_scores(inp: CriterionInputs, criterion: str) -> list[float]:
    """One importance per hidden channel (higher = more important) from the width criterion's hidden form."""
    return CRITERIA.get("width", criterion).load_hidden()(inp)


def _grad(name: str, table: Any) -> torch.Tensor:
    if name not in table:
        raise ValueError(f"no gradient for {name}: the width score stage collects gradients of embeddings, norms "
                         "and head only when a later prune stage prunes hidden channels")
    return table[name]


def _elementwise(inp: CriterionInputs, imp: Callable[[str, torch.Tensor], torch.Tensor], how: str) -> torch.Tensor:
    parts = [_per_channel(imp(name, t.detach().float()), axis) for name, t, axis in hidden_members(inp.model)]
    return reduce_parts(parts, how)


def magnitude(inp: CriterionInputs) -> list[float]:
    """The group's L2 norm: the square root of the summed squares, whatever the reduction."""
    return _elementwise(inp, lambda n, w: w * w, "sum").sqrt().tolist()


def magnitude_l1(inp: CriterionInputs) -> list[float]:
    return _elementwise(inp, lambda n, w: w.abs(), reduction(inp)).tolist()


def random(inp: CriterionInputs) -> list[float]:
    gen = torch.Generator().manual_seed(inp.seed + 7919)  # not the per-layer units' stream
    return torch.rand(inp.model.config.hidden_size, generator=gen, dtype=torch.float64).tolist()


def taylor(inp: CriterionInputs) -> list[float]:
    grad = inp.stats.grad_mean
    return _elementwise(inp, lambda n, w: (w * _grad(n, grad)).abs(), reduction(inp)).tolist()


def taylor_element2(inp: CriterionInputs) -> list[float]:
    grad, fisher = inp.stats.grad_mean, inp.stats.fisher
    return _elementwise(inp, lambda n, w: (w * _grad(n, grad) - 0.5 * w * _grad(n, fisher) * w).abs(),
                        reduction(inp)).tolist()


def taylor_vector(inp: CriterionInputs) -> list[float]:
    """|Σ_k g·w| over each member vector: the signed product summed before |·|."""
    grad = inp.stats.grad_mean
    parts = [_per_channel(t.detach().float() * _grad(name, grad), axis).abs() for name, t, axis in hidden_members(inp.model)]
    return reduce_parts(parts, reduction(inp)).tolist()
