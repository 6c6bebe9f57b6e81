"""Gemma 2 and Gemma 3 (text): Llama's projection names with what makes the family differ.

- ``head_dim`` is explicit (≠ hidden / heads); attention scales by ``query_pre_attn_scalar`` (no width in it);
- four norms per layer: pre- and post-sublayer (``input_layernorm``, ``post_attention_layernorm``,
  ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``), all hidden-sized; Gemma 3 adds per-head
  ``q_norm`` / ``k_norm`` (over head_dim, untouched by width units);
- RMSNorms multiply by (1 + w): the hidden-channel rescale scales the effective weight, w' = (1 + w)·sqrt(d/d') − 1,
  which is exact as for Llama's w;
- the embedding module multiplies by sqrt(hidden_size), which hidden-channel pruning changes: the kept embedding
  weights are multiplied by sqrt(d/d') so the embedded state is unchanged, and where the head is tied to them the
  final norm divides the factor back out (its effective weight is not rescaled) — exact again;
- logits are soft-capped (tanh(z / cap)·cap, ``final_logit_softcapping``), as are Gemma 2's attention scores;
- layers alternate sliding-window and full attention (``config.layer_types``): the block-wise forward gives each
  layer its own mask (and, on Gemma 3, its own rotary embedding: local and global rope bases differ);
- ``attention_bias`` switches q/k/v/o biases on; the MLP never has one (down_proj cannot hold compensation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from prunelab.stages.arch import register_family
from prunelab.stages.arch.base import ArchAdapter, BlockInputs
from prunelab.stages.arch.facts import FamilyFacts, lazy_module

if TYPE_CHECKING:
    import torch
    from torch import nn
else:  # imported on first use (stages.arch.facts: the facts above are read without torch)
    torch = lazy_module("torch")

# The tiny models: head_dim ≠ hidden/heads, soft-capped attention scores and logits (caps low enough to bend random
# logits), a sliding window (12 < the test sequences) on every other layer; Gemma 3 adds per-head q/k norms and a
# local rope base of its own on the sliding layers.
register_family(FamilyFacts(model_types=("gemma2",), adapter=f"{__name__}:Gemma2Adapter", no_output_bias=("down",),
                            layer_norms=4, tiny={"head_dim": 24, "sliding_window": 12, "final_logit_softcapping": 3.0,
                                                 "attn_logit_softcapping": 5.0}))
register_family(FamilyFacts(model_types=("gemma3_text",), adapter=f"{__name__}:Gemma3Adapter", no_output_bias=("down",),
                            layer_norms=4, qk_norm="head",
                            tiny={"head_dim": 24, "sliding_window": 12, "sliding_window_pattern": 2,
                                  "final_logit_softcapping": 3.0, "rope_local_base_freq": 100.0}))


class Gemma2Adapter(ArchAdapter):
    family = "Gemma 2"
    LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    NORM_OFFSET = 1.0

    BIAS_FLAGS: ClassVar[dict[str, str]] = {"attn": "attention_bias"}

    def hidden_embedding(self, weight: torch.Tensor, padding_idx: int | None, d_before: int) -> nn.Module:
        d_after = weight.shape[1]
        old = self.embedding
        new = type(old)(weight.shape[0], d_after, padding_idx, embed_scale=d_after**0.5).to(weight.device, weight.dtype)
        new.weight.data.copy_(weight * self.embedding_rescale(d_before, d_after))
        return new

    def embedding_rescale(self, d_before: int, d_after: int) -> float:
        return (d_before / d_after) ** 0.5

    def reset_rotary(self, config: Any, device: Any) -> None:
        """The rotary buffers, and the embedding's sqrt(hidden) scale: a non-persistent buffer too (the prunelab
        loader builds on the meta device)."""
        super().reset_rotary(config, device)
        emb = self.embedding
        emb.embed_scale = torch.tensor(emb.scalar_embed_scale, device=device)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        out = self.head(normed)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return out if cap is None else torch.tanh(out / cap) * cap

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str) -> Any:
        return self.model.get_submodule(self.ROTARY)(hidden, position_ids=position_ids)

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        return {t: self.rotary(hidden, position_ids, t) for t in sorted(set(self.model.config.layer_types))}

    def run_block(self, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        kind = self.model.config.layer_types[index]  # the layers themselves do not record it
        out = self.layers[index](
            hidden,
            attention_mask=inputs.masks[kind],
            position_embeddings=inputs.position_embeddings[kind],
            position_ids=inputs.position_ids,
            use_cache=False,
        )
        return out[0] if isinstance(out, tuple) else out


class Gemma3Adapter(Gemma2Adapter):
    family = "Gemma 3"
    HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
    NORM_INPUTS: ClassVar[dict[str, str]] = {"self_attn.q_norm": "q", "self_attn.k_norm": "k"}

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str) -> Any:
        return self.model.get_submodule(self.ROTARY)(hidden, position_ids, layer_type)

