"""Stand-ins for a removed attention or MLP sublayer (He et al., arXiv 2406.15786; Puzzle's no-op blocks).

A decoder layer adds each sublayer's output to its residual stream, so a sublayer that returns zeros is a removed
sublayer: the layer's own ``forward`` is untouched and the model stays a plain transformers model. Both modules
hold no parameters; the loader rebuilds them from ``config.prunelab_layer_shapes`` (0 heads / 0 MLP channels).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# the keyword the decoder layer passes its KV cache under: ``cache`` in transformers 5.25+, ``past_key_values`` before
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


class NoAttention(nn.Module):
    """A removed attention sublayer: zeros of the input's shape, no attention weights.

    It still writes one (batch, 1, tokens, 1) zero entry into its KV-cache layer: transformers reads the cache's
    sequence length (generation positions, the causal mask) from layer 0 by default, and an empty layer would
    report 0 after layer 0 lost its attention. The entry costs one float per token and is never attended to.
    ``layer_idx`` stays an attribute so block removal renumbers it like a real attention's.
    """

    def __init__(self, layer_idx: int, head_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.hidden_size = hidden_size

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        if cache is not None:
            b, t = hidden_states.shape[:2]
            z = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(z, z, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"removed (layer_idx={self.layer_idx})"


class NoMLP(nn.Module):
    """A removed MLP sublayer: zeros of the input's shape."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)

    def extra_repr(self) -> str:
        return "removed"
