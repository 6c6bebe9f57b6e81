"""SmolLM3: Llama's module layout, with layers that run without rotary embeddings (NoPE).

- ``config.no_rope_layers[i]`` (1: rope, 0: NoPE; every ``no_rope_layer_interval``-th layer by default) is read by
  each attention at construction (``use_rope``), so the list is per layer like ``layer_types``: when blocks go, it
  keeps the kept blocks' entries (``keep_blocks_config``) — otherwise a vanilla reload would rebuild a kept rope layer
  as NoPE (or the reverse) and its logits would change;
- with ``use_sliding_window`` the NoPE layers attend through a sliding window (``layer_types``); the decoder layer does
  not record its type, so the block-wise forward reads it from the config;
- biases follow Llama's flags (``attention_bias``: q/k/v/o, ``mlp_bias``: gate/up/down), so compensation can live in
  o_proj / down_proj; each sublayer's output is added to the residual stream (sublayers can go).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunelab.stages.arch import register_family
from prunelab.stages.arch.base import ArchAdapter, BlockInputs
from prunelab.stages.arch.facts import FamilyFacts

if TYPE_CHECKING:
    import torch

# The tiny model: every other layer NoPE (layers 1, 3, …), and those layers on a sliding window of 12 (< the test
# sequences), so both the rotary and the mask differ from layer to layer.
register_family(FamilyFacts(model_types=("smollm3",), adapter=f"{__name__}:SmolLM3Adapter", sublayers=True,
                            engines={"llama.cpp": "smollm3"},
                            tiny={"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": 12}))


class SmolLM3Adapter(ArchAdapter):
    family = "SmolLM3"

    def keep_blocks_config(self, keep: list[int]) -> None:
        rope = list(self.model.config.no_rope_layers)
        super().keep_blocks_config(keep)
        self.model.config.no_rope_layers = [rope[i] for i in keep]

    def run_block(self, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        kind = self.model.config.layer_types[index]  # SmolLM3DecoderLayer does not record it
        out = self.layers[index](hidden, attention_mask=inputs.masks[kind], position_ids=inputs.position_ids,
                                 position_embeddings=inputs.position_embeddings, use_cache=False)
        return out[0] if isinstance(out, tuple) else out
