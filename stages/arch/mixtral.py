"""Mixtral: Llama/Mistral attention (sliding window when configured) and a top-k MoE MLP (``prunelab.stages.arch.moe``).
The expert count is ``num_local_experts``, each expert's width ``intermediate_size``; the router always
renormalises the top-k probabilities."""

from __future__ import annotations

from typing import ClassVar

from prunelab.stages.arch import register_arch
from prunelab.stages.arch.moe import MoeAdapter


class MixtralAdapter(MoeAdapter):
    family = "Mixtral"
    EXPERT_CONFIG: ClassVar[tuple[str, str]] = ("num_local_experts", "intermediate_size")


register_arch(MixtralAdapter, model_types=("mixtral",))
