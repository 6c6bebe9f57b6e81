"""Granite: Llama's module layout with four scalar multipliers, which the block-wise forward must apply too.

``embedding_multiplier`` scales the token embeddings (in ``GraniteModel.forward``, not in the embedding module),
``residual_multiplier`` each sublayer's output (inside the decoder layer), ``attention_multiplier`` replaces
1/sqrt(head_dim) (inside attention) and ``logits_scaling`` divides the logits (in ``GraniteForCausalLM``). Width
units and hidden channels leave all four valid: none depends on a width. Biases follow Llama's flags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunelab.stages.arch import register_family
from prunelab.stages.arch.base import ArchAdapter
from prunelab.stages.arch.facts import FamilyFacts

if TYPE_CHECKING:
    import torch

# every multiplier of the tiny model away from 1
register_family(FamilyFacts(model_types=("granite",), adapter=f"{__name__}:GraniteAdapter", sublayers=True,
                            tiny={"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                                  "logits_scaling": 2.0}))


class GraniteAdapter(ArchAdapter):
    family = "Granite"

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids) * self.model.config.embedding_multiplier

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.head(normed) / self.model.config.logits_scaling

