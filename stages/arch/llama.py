"""Llama-layout decoders: Llama (SmolLM), Mistral. (``adapter_for`` is re-exported for older imports.)

The layout itself (``model.layers / model.norm / lm_head``, ``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``) is ``ArchAdapter``'s default; this file registers the families that use it
as is. Criteria run the model block by block through the adapter, so hidden states entering every
block can be cached and re-used (the PPL criterion and SLEB never recompute the blocks before a
removed one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunelab.stages.arch import adapter_for, register_family
from prunelab.stages.arch.base import ArchAdapter, BlockInputs
from prunelab.stages.arch.facts import FamilyFacts
from prunelab.stages.core.compat import cache_kwargs

if TYPE_CHECKING:
    import torch

# Both run per-layer widths in llama.cpp (as deci) and vLLM (as DeciLM): the Llama layout those read.
register_family(FamilyFacts(model_types=("llama",), adapter=f"{__name__}:LlamaAdapter", sublayers=True,
                            engines={"llama.cpp": "llama"}, per_layer_engines=("llama.cpp", "vllm"),
                            tiny={"head_dim": 16}, tiny_layers=6))
# a window shorter than the test sequences: the sliding mask matters
register_family(FamilyFacts(model_types=("mistral",), adapter=f"{__name__}:MistralAdapter", sublayers=True,
                            no_output_bias=("o", "down"), engines={"llama.cpp": "llama"},
                            per_layer_engines=("llama.cpp", "vllm"), tiny={"head_dim": 16, "sliding_window": 12}))

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


class MistralAdapter(ArchAdapter):
    """Mistral: Llama's layout with bias-free projections and a sliding window applied to every layer."""

    family = "Mistral"

    @classmethod
    def bias_flags(cls) -> dict[str, str]:
        return {}  # MistralConfig has no bias flags: every projection is built without one

    def prepare(self, hidden: torch.Tensor) -> BlockInputs:
        from transformers.masking_utils import create_sliding_window_causal_mask  # lazy: torch-free

        inputs = super().prepare(hidden)
        if getattr(self.model.config, "sliding_window", None) is not None:  # MistralModel uses it for every layer
            inputs.masks["full_attention"] = create_sliding_window_causal_mask(
                config=self.model.config, inputs_embeds=hidden, attention_mask=None,
                **cache_kwargs(create_sliding_window_causal_mask),
                position_ids=inputs.position_ids)
        return inputs


__all__ = ["UNIT_MEMBERS", "LlamaAdapter", "MistralAdapter", "adapter_for"]
