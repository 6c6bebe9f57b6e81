"""Width units and the summaries of their observed inputs.

Units of a Llama-layout layer (``head_dim`` never changes):
- KV group g: K head g, V head g, the ``n_q / n_kv`` query heads that share them, and those heads'
  ``o_proj`` input columns;
- query head h (inside its group): its ``q_proj`` rows and ``o_proj`` columns — removed uniformly
  across groups so ``num_attention_heads`` stays a multiple of ``num_key_value_heads``;
- MLP channel c: ``gate_proj`` row c, ``up_proj`` row c, ``down_proj`` column c.

The ``activations`` observer (``prunelab.stages.calibration.observers``: forward pre-hooks on ``o_proj`` and
``down_proj``, whose inputs are exactly the channels those units own, and on ``q_proj`` and ``gate_proj`` for
OWL's outlier ratios) keeps per input channel the mean (FLAP's bias compensation), the sample variance (FLAP's
fluctuation) and the squared norm (Wanda-sp), in float64 (``ChannelStats``); the ``hessian`` observer adds XᵀX
of o_proj/down_proj inputs. ``summary_tensors`` is what selection reads of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from prunelab.stages.arch import layer_adapter
from prunelab.stages.arch.base import OBSERVED_ROLES, STAT_KEYS, LayerGeometry
from prunelab.stages.calibration.channels import ChannelStats

if TYPE_CHECKING:
    from prunelab.stages.calibration.stats import CalibrationStats

__all__ = ["COMPENSATED", "OBSERVED", "ChannelStats", "LayerGeometry", "geometry", "summary_tensors"]

OBSERVED = tuple(STAT_KEYS[r] for r in OBSERVED_ROLES)  # CalibrationStats fields, one ChannelStats per layer
COMPENSATED = (STAT_KEYS["o"], STAT_KEYS["down"])  # slots whose XᵀX optimal compensation needs


def geometry(layer: torch.nn.Module) -> LayerGeometry:
    """A lone layer's geometry, as its family's adapter reads it; with a model at hand ask ``adapter_for(model)``."""
    return layer_adapter(layer).geometry(layer)


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
