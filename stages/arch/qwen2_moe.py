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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from prunelab.stages.arch import dense_mlp_layers, dense_moe_layers_refusal, register_family
from prunelab.stages.arch.base import MLP_ROLES, LayerGeometry
from prunelab.stages.arch.base_names import LINEAR_NAMES
from prunelab.stages.arch.facts import FamilyFacts
from prunelab.stages.arch.moe import MoeAdapter

if TYPE_CHECKING:
    from torch import nn


def _dense_mlp_layers(get: Callable[..., Any]) -> list[int]:
    """The layers ``Qwen2MoeDecoderLayer`` builds with a plain dense MLP: listed in ``mlp_only_layers``, or skipped by
    ``decoder_sparse_step`` (``get(key, default)`` reads the config)."""
    only, step = set(get("mlp_only_layers") or ()), get("decoder_sparse_step") or 1
    experts = get("num_experts") or 0
    return [i for i in range(get("num_hidden_layers") or 0) if i in only or not (experts > 0 and (i + 1) % step == 0)]


# Qwen2 attention (q/k/v biases) + 4 experts of width 32, top-2, not renormalised, and a shared expert of width 48
# (another width than the experts', so the two cannot be confused) behind its sigmoid gate
register_family(FamilyFacts(model_types=("qwen2_moe",), adapter=f"{__name__}:Qwen2MoeAdapter", moe=True,
                            shared_expert=True, no_output_bias=("o", "down"), qkv_bias="qkv_bias",
                            dense_mlp_layers=_dense_mlp_layers,
                            tiny={"tie": False, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                  "shared_expert_intermediate_size": 48}))

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

