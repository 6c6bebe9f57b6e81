"""Surgery for sublayer removal: whole attention / MLP sublayers replaced by parameter-free no-ops.

Each removed sublayer (and the norm serving only it) becomes ``prunelab.stages.arch.noop.NoAttention`` / ``NoMLP`` through
the family's adapter, so the block keeps its index, its KV-cache slot and its own ``forward``. The config then
carries ``prunelab_layer_shapes`` with ``num_attention_heads = num_key_value_heads = 0`` for a removed attention
and ``intermediate_size = 0`` for a removed MLP — the convention ``load_pruned``, the GGUF ``deci`` export (0 =
no attention / no FFN) and the vLLM ``no_op`` export read.
"""

from __future__ import annotations

from torch import nn

import prunelab.stages.arch as arch_tables  # its tables are derived on every read
from prunelab.stages.arch import adapter_for
from prunelab.stages.surgery.plan import PlanError


def sublayer_refusal(model: nn.Module) -> str | None:
    """Why this model's sublayers cannot be removed (None: they can)."""
    ad = adapter_for(model)
    if not ad.SUBLAYER_REMOVAL:
        return (f"{ad.family or model.config.model_type} (model_type {model.config.model_type!r}): sublayer removal "
                "needs a decoder layer that adds each sublayer's output to the residual stream with the Llama layout; "
                f"supported: {', '.join(arch_tables.SUBLAYER_FAMILIES)} — use units: blocks or width for this family")
    return None


def remove_sublayers(model: nn.Module, attention: list[int], mlp: list[int]) -> None:
    """Remove the attention sublayers of layers ``attention`` and the MLP sublayers of layers ``mlp`` (0-based)."""
    refusal = sublayer_refusal(model)
    if refusal:
        raise PlanError(refusal)
    ad = adapter_for(model)
    n = ad.num_blocks
    for name, idx in (("attention", attention), ("mlp", mlp)):
        if len(set(idx)) != len(idx) or any(not 0 <= i < n for i in idx):
            raise PlanError(f"removed_{name} {idx} must be distinct layer indices in [0, {n})")
        gone = [i for i in idx if not ad.has_sublayer(ad.layers[i], name)]
        if gone:
            raise PlanError(f"the {name} sublayer of layers {gone} is already removed (plan applied twice?)")
        if len(idx) >= n:
            raise PlanError(f"cannot remove the {name} sublayer of all {n} layers")
    for i in attention:
        ad.remove_sublayer(ad.layers[i], "attention")
    for i in mlp:
        ad.remove_sublayer(ad.layers[i], "mlp")
