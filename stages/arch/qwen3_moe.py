"""Qwen3-MoE: Qwen3 attention (per-head ``q_norm``/``k_norm``, head_dim ≠ hidden/heads) and a top-k MoE MLP
(``prunelab.stages.arch.moe``). The expert count is ``num_experts``, each expert's width ``moe_intermediate_size``; the
router renormalises the top-k probabilities only with ``norm_topk_prob``. Layers listed in ``mlp_only_layers`` (or
skipped by ``decoder_sparse_step``) have a dense MLP instead; their geometry reads no experts."""

from __future__ import annotations

from typing import ClassVar

from prunelab.stages.arch import register_family
from prunelab.stages.arch.facts import FamilyFacts
from prunelab.stages.arch.moe import MoeAdapter

# Qwen3 attention + 4 experts of width 32, top-2, probabilities not renormalised (norm_topk_prob false)
register_family(FamilyFacts(model_types=("qwen3_moe",), adapter=f"{__name__}:Qwen3MoeAdapter", moe=True,
                            no_output_bias=("o", "down"),
                            tiny={"head_dim": 24, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}))


class Qwen3MoeAdapter(MoeAdapter):
    family = "Qwen3-MoE"
    HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
    NORM_INPUTS: ClassVar[dict[str, str]] = {"self_attn.q_norm": "q", "self_attn.k_norm": "k"}
    EXPERT_CONFIG: ClassVar[tuple[str, str]] = ("num_experts", "moe_intermediate_size")

