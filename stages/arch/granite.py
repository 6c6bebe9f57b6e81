"""Granite: Llama's module layout with four scalar multipliers, which the block-wise forward must apply too.

``embedding_multiplier`` scales the token embeddings (in ``GraniteModel.forward``, not in the embedding module),
``residual_multiplier`` each sublayer's output (inside the decoder layer), ``attention_multiplier`` replaces
1/sqrt(head_dim) (inside attention) and ``logits_scaling`` divides the logits (in ``GraniteForCausalLM``). Width
units and hidden channels leave all four valid: none depends on a width. Biases follow Llama's flags.
"""

from __future__ import annotations

import torch

from prunelab.stages.arch import register_arch
from prunelab.stages.arch.base import ArchAdapter


class GraniteAdapter(ArchAdapter):
    family = "Granite"
    SUBLAYER_REMOVAL = True

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed(input_ids) * self.model.config.embedding_multiplier

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.head(normed) / self.model.config.logits_scaling


register_arch(GraniteAdapter, model_types=("granite",))
