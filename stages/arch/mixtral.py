"""Mixtral: Llama/Mistral attention (sliding window when configured) and a top-k MoE MLP (``prunelab.stages.arch.moe``).
The expert count is ``num_local_experts``, each expert's width ``intermediate_size``; the router always
renormalises the top-k probabilities."""

from __future__ import annotations

from typing import ClassVar

from prunelab.stages.arch import register_family
from prunelab.stages.arch.facts import FamilyFacts
from prunelab.stages.arch.moe import MoeAdapter

# 4 experts, top-2 (the router renormalises); each expert 128 wide (`intermediate_size`)
register_family(FamilyFacts(model_types=("mixtral",), adapter=f"{__name__}:MixtralAdapter", moe=True,
                            no_output_bias=("o", "down"), tiny={"num_local_experts": 4, "num_experts_per_tok": 2}))


class MixtralAdapter(MoeAdapter):
    family = "Mixtral"
    EXPERT_CONFIG: ClassVar[tuple[str, str]] = ("num_local_experts", "intermediate_size")

