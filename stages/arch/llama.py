"""Architecture adapter for Llama-layout decoders (Llama, Mistral, Qwen2, SmolLM).

The adapter is the only place that knows where the blocks, embeddings, norm and head live and how
to call one block on its own. Criteria use it to run the model block by block, so that hidden
states entering every block can be cached and re-used (the PPL criterion and SLEB never recompute
the blocks before a removed one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# The coupled members of each width unit: (module path inside a decoder layer, which side is cut).
# "out" slices output rows (and the bias), "in" slices input columns. Tests cross-check the MLP
# entry against torch-pruning's DependencyGraph.
UNIT_MEMBERS: dict[str, tuple[tuple[str, str], ...]] = {
    "mlp": (("mlp.gate_proj", "out"), ("mlp.up_proj", "out"), ("mlp.down_proj", "in")),
    "q_head": (("self_attn.q_proj", "out"), ("self_attn.o_proj", "in")),
    "kv_group": (("self_attn.q_proj", "out"), ("self_attn.k_proj", "out"), ("self_attn.v_proj", "out"), ("self_attn.o_proj", "in")),
}


@dataclass
class BlockInputs:
    """What every block needs besides the hidden state; computed once per batch."""

    masks: dict[str, Any]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor


class LlamaAdapter:
    """Block-level access to a ``*ForCausalLM`` with the ``model.layers / model.norm / lm_head`` layout."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} has no architecture adapter yet; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model
        self.inner = model.model

    # ------------------------------------------------------------------ structure
    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    @property
    def num_blocks(self) -> int:
        return len(self.inner.layers)

    def block_param_counts(self) -> list[int]:
        return [sum(p.numel() for p in layer.parameters()) for layer in self.inner.layers]

    def total_params(self) -> int:
        """All parameters, embeddings and head included, tied weights counted once (as papers count)."""
        return sum(p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------ block-wise forward
    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(input_ids.to(self.device))

    def prepare(self, hidden: torch.Tensor) -> BlockInputs:
        """Causal masks (per attention type) and rotary embeddings for a batch without padding."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        cfg = self.model.config
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = dict(config=cfg, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=position_ids)
        masks: dict[str, Any] = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        pos = self.inner.rotary_emb(hidden, position_ids=position_ids)
        return BlockInputs(masks, pos, position_ids)

    def run_block(self, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        layer = self.inner.layers[index]
        kind = getattr(layer, "attention_type", "full_attention")
        out = layer(
            hidden,
            attention_mask=inputs.masks.get(kind, inputs.masks["full_attention"]),
            position_embeddings=inputs.position_embeddings,
            position_ids=inputs.position_ids,
            past_key_values=None,
            use_cache=False,
        )
        return out[0] if isinstance(out, tuple) else out

    def boundary_states(self, input_ids: torch.Tensor, skip: frozenset[int] = frozenset()) -> list[torch.Tensor]:
        """Hidden states at every block boundary: [x_0 (embeddings), x_1, ..., x_L] for the kept blocks."""
        hidden = self.embed(input_ids)
        inputs = self.prepare(hidden)
        states = [hidden]
        for i in range(self.num_blocks):
            if i in skip:
                continue
            hidden = self.run_block(i, hidden, inputs)
            states.append(hidden)
        return states

    def nll_sum(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL and predicted-token count for a batch (see ``nll_per_sequence``)."""
        ids = input_ids.to(hidden.device)
        return self.nll_per_sequence(hidden, ids).sum().item(), ids[:, 1:].numel()

    def nll_per_sequence(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 128, normed: bool = False
    ) -> torch.Tensor:
        """Summed next-token NLL of every sequence in the batch (float64): final norm (unless the state
        is already ``normed``) → LM head → cross-entropy, chunked over rows so the (tokens × vocab)
        logits stay small for 50k–150k vocabularies."""
        batch, length = input_ids.shape
        normed = (hidden if normed else self.inner.norm(hidden))[:, :-1].reshape(-1, hidden.shape[-1])
        labels = input_ids[:, 1:].reshape(-1)
        losses = torch.empty(labels.numel(), dtype=torch.float64, device=hidden.device)
        for s in range(0, labels.numel(), chunk_tokens):
            logits = self.model.lm_head(normed[s : s + chunk_tokens]).float()
            losses[s : s + chunk_tokens] = torch.nn.functional.cross_entropy(
                logits, labels[s : s + chunk_tokens], reduction="none"
            ).double()
        return losses.view(batch, length - 1).sum(-1)


def adapter_for(model: nn.Module) -> LlamaAdapter:
    """The adapter for ``model``; a clear error for architectures we do not support yet."""
    return LlamaAdapter(model)
