"""Qwen2-MoE: Qwen2 attention (q/k/v biases, none on o_proj) and a MoE MLP with a **shared expert**.

The routed experts are ``prunelab.stages.arch.moe``'s (count ``num_experts``, width ``moe_intermediate_size``; the router
renormalises the top-k only with ``norm_topk_prob``). Beside them every MoE layer runs ``mlp.shared_expert``, a dense
gate/up/down MLP of width ``shared_expert_intermediate_size``, on every token; its output is multiplied by
sigmoid(``mlp.shared_expert_gate``(x)), a Linear(H, 1) that reads the hidden state. That dense MLP is the family's
``mlp_channel`` unit (the MLP roles name its projections): removing channel c (gate/up row c, down column c) equals
zeroing it, and the scalar gate, which sees no intermediate channel, stays as it is. transformers reads one shared
width from the config, so every layer keeps the same one (``UNIFORM_WIDTHS_ONLY``, ``MLP_CONFIG``).

Layers that ``mlp_only_layers`` / ``decoder_sparse_step`` make a plain dense MLP (no experts, no shared expert) are
refused (``prunelab.stages.arch.dense_mlp_layers``; at ``--dry-run`` too): their MLP sits at other module paths with another
config width, and block removal would have to renumber ``mlp_only_layers``. Qwen1.5-MoE-A2.7B's config, for one,
makes every layer a MoE layer.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from prunelab.stages.arch import dense_mlp_layers, dense_moe_layers_refusal, register_arch
from prunelab.stages.arch.base import MLP_ROLES, LayerGeometry
from prunelab.stages.arch.base_names import LINEAR_NAMES
from prunelab.stages.arch.moe import MoeAdapter

SHARED = "mlp.shared_expert"


class Qwen2MoeAdapter(MoeAdapter):
    family = "Qwen2-MoE"
    # attention as Llama's paths; the MLP roles are the shared expert's projections (the dense MLP unit)
    LINEARS: ClassVar[dict[str, str]] = {**MoeAdapter.LINEARS, **{r: f"{SHARED}.{LINEAR_NAMES[r]}" for r in MLP_ROLES}}
    UNIT_KINDS: ClassVar[tuple[str, ...]] = ("block", "kv_group", "q_head", "mlp_channel", "expert", "expert_channel")
    EXPERT_CONFIG: ClassVar[tuple[str, str]] = ("num_experts", "moe_intermediate_size")
    MLP_CONFIG: ClassVar[str | None] = "shared_expert_intermediate_size"

    def __init__(self, model: nn.Module) -> None:
        refusal = dense_moe_layers_refusal("qwen2_moe", dense_mlp_layers("qwen2_moe", model.config))
        if refusal:
            raise ValueError(refusal)
        super().__init__(model)

    @classmethod
    def geometry(cls, layer: nn.Module) -> LayerGeometry:
        """The routed experts' geometry plus the shared expert's width as the dense ``intermediate``."""
        return dataclasses.replace(super().geometry(layer), intermediate=cls.linear(layer, "gate").out_features)

    @classmethod
    def set_intermediate(cls, layer: nn.Module, inter: int) -> None:
        layer.get_submodule(SHARED).intermediate_size = inter


register_arch(Qwen2MoeAdapter, model_types=("qwen2_moe",))
