"""Qwen2 and Qwen3: Llama's layout with family-specific biases and norms.

- Qwen2 builds q/k/v with a bias and o_proj/down_proj without one (whatever the config says), so
  bias/optimal compensation has nowhere to put its shift that a vanilla reload keeps;
- Qwen3 adds per-head RMSNorms (``q_norm``, ``k_norm`` over head_dim) — width units remove whole
  heads, so they are untouched (hidden-channel pruning rescales their ε with the config's and scales q_proj /
  k_proj by sqrt(d/d'), which takes it back out: ``NORM_INPUTS``); ``attention_bias`` switches q/k/v/o biases on,
  down_proj has none.
"""

from __future__ import annotations

from typing import ClassVar

from prunelab.stages.arch import register_arch
from prunelab.stages.arch.base import ArchAdapter


class Qwen2Adapter(ArchAdapter):
    family = "Qwen2"
    SUBLAYER_REMOVAL = True

    BIAS_HOLDERS: ClassVar[dict[str, bool]] = {"o": False, "down": False}
    BIAS_FLAGS: ClassVar[dict[str, str]] = {}


class Qwen3Adapter(ArchAdapter):
    family = "Qwen3"
    SUBLAYER_REMOVAL = True
    HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
    NORM_INPUTS: ClassVar[dict[str, str]] = {"self_attn.q_norm": "q", "self_attn.k_norm": "k"}

    BIAS_HOLDERS: ClassVar[dict[str, bool]] = {"o": True, "down": False}
    BIAS_FLAGS: ClassVar[dict[str, str]] = {"attn": "attention_bias"}


register_arch(Qwen2Adapter, model_types=("qwen2",))
register_arch(Qwen3Adapter, model_types=("qwen3",))
