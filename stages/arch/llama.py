"""Llama-layout decoders: Llama (SmolLM), Mistral. (``adapter_for`` is re-exported for older imports.)

The layout itself (``model.layers / model.norm / lm_head``, ``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``) is ``ArchAdapter``'s default; this file registers the families that use it
as is. Criteria run the model block by block through the adapter, so hidden states entering every
block can be cached and re-used (the PPL criterion and SLEB never recompute the blocks before a
removed one).
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.stages.arch import adapter_for, register_arch
from prunelab.stages.arch.base import ArchAdapter, BlockInputs

# The coupled members of each width unit: (module path inside a decoder layer, which side is cut).
# "out" slices output rows (and the bias), "in" slices input columns. Tests cross-check the entries
# against torch-pruning's DependencyGraph; ``ArchAdapter.members`` adds the index maps.
UNIT_MEMBERS: dict[str, tuple[tuple[str, str], ...]] = {
    kind: tuple((m.path, m.axis) for m in ArchAdapter.members(unit))
    for kind, unit in (("mlp", "mlp_channel"), ("q_head", "q_head"), ("kv_group", "kv_group"))
}


class LlamaAdapter(ArchAdapter):
    """Llama: ``attention_bias`` / ``mlp_bias`` switch on biases of all attention / MLP projections."""

    family = "Llama"
    SUBLAYER_REMOVAL = True


class MistralAdapter(ArchAdapter):
    """Mistral: Llama's layout with bias-free projections and a sliding window applied to every layer."""

    family = "Mistral"
    SUBLAYER_REMOVAL = True

    @classmethod
    def bias_holders(cls, config: Any) -> dict[str, bool]:
        return {"o": False, "down": False}

    @classmethod
    def bias_flags(cls) -> dict[str, str]:
        return {}  # MistralConfig has no bias flags: every projection is built without one

    def prepare(self, hidden: torch.Tensor) -> BlockInputs:
        from transformers.masking_utils import create_sliding_window_causal_mask

        from prunelab.stages.core.compat import cache_kwargs

        inputs = super().prepare(hidden)
        if getattr(self.model.config, "sliding_window", None) is not None:  # MistralModel uses it for every layer
            inputs.masks["full_attention"] = create_sliding_window_causal_mask(
                config=self.model.config, inputs_embeds=hidden, attention_mask=None,
                **cache_kwargs(create_sliding_window_causal_mask),
                position_ids=inputs.position_ids)
        return inputs


register_arch(LlamaAdapter, model_types=("llama",))
register_arch(MistralAdapter, model_types=("mistral",))

__all__ = ["UNIT_MEMBERS", "LlamaAdapter", "MistralAdapter", "adapter_for"]
