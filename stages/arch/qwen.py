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

from prunelab.stages.arch import register_family
from prunelab.stages.arch.base import ArchAdapter
from prunelab.stages.arch.facts import FamilyFacts

# untied embeddings in the tiny model; its q/k/v biases are randomised (stages.io.tiny)
register_family(FamilyFacts(model_types=("qwen2",), adapter=f"{__name__}:Qwen2Adapter", sublayers=True,
                            no_output_bias=("o", "down"), qkv_bias=True, engines={"llama.cpp": "qwen2"},
                            per_layer_engines=("llama.cpp",), tiny={"tie": False}))  # deci loads q/k/v biases
# head_dim ≠ hidden / heads in the tiny model
register_family(FamilyFacts(model_types=("qwen3",), adapter=f"{__name__}:Qwen3Adapter", sublayers=True,
                            no_output_bias=("down",), qk_norm="head", engines={"llama.cpp": "qwen3"},
                            tiny={"head_dim": 24}))


class Qwen2Adapter(ArchAdapter):
    family = "Qwen2"

    BIAS_FLAGS: ClassVar[dict[str, str]] = {}


class Qwen3Adapter(ArchAdapter):
    family = "Qwen3"
    HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
    NORM_INPUTS: ClassVar[dict[str, str]] = {"self_attn.q_norm": "q", "self_attn.k_norm": "k"}

    BIAS_FLAGS: ClassVar[dict[str, str]] = {"attn": "attention_bias"}
