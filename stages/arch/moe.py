"""Mixture-of-experts layers (Mixtral, Qwen3-MoE, Qwen2-MoE): attention as Llama, the MLP a router plus routed experts
(Qwen2-MoE adds a dense shared expert: ``prunelab.stages.arch.qwen2_moe``).

In transformers 5 the experts are fused 3-D parameters, not per-expert linears: ``mlp.experts.gate_up_proj``
[E, 2I, H] (gate's I rows, then up's) and ``mlp.experts.down_proj`` [E, H, I]; the router ``mlp.gate`` holds
``weight`` [E, H], takes the top-k of softmax(router logits) and weights each chosen expert's output. Two unit kinds:

- **expert** e: router row e and slice e of both expert tensors. Removing it equals setting its router logit to −∞
  before the top-k: the softmax over the kept experts is the softmax over all with e at probability 0, so the
  top-k and the (renormalised or not) weights are the same;
- **expert channel** c of expert e: row c and row I + c of gate_up_proj[e], column c of down_proj[e]. transformers
  keeps one width for every expert (a 3-D tensor) and reads it from the config, so every expert (and every layer)
  loses the same number of channels — which ones is per expert.

transformers reads the expert count and width from the shared config: every MoE layer keeps the same numbers
(``UNIFORM_WIDTHS_ONLY``), and ``num_experts_per_tok`` must stay ≤ the experts left. MoE layers have no dense MLP
(``intermediate`` is 0 in their geometry, the MLP roles have no linear) and no bias a compensation could use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from prunelab.stages.arch.base import ATTN_ROLES, ArchAdapter, LayerGeometry, Member
from prunelab.stages.arch.base_names import LINEAR_NAMES
from prunelab.stages.arch.facts import lazy_module

if TYPE_CHECKING:
    import torch
    from torch import nn
else:  # imported on first use: the MoE family files are read for their facts without torch (stages.arch.facts)
    nn = lazy_module("torch.nn")

ROUTER, EXPERTS = "mlp.gate", "mlp.experts"
GATE_UP, DOWN = f"{EXPERTS}.gate_up_proj", f"{EXPERTS}.down_proj"


def _same(units: list[int], _g: LayerGeometry) -> list[int]:
    return list(units)


def _gate_up_rows(units: list[int], g: LayerGeometry) -> list[int]:
    return list(units) + [g.expert_intermediate + c for c in units]


class MoeAdapter(ArchAdapter):
    """Llama attention, a top-k router and fused experts. Subclasses name the config keys of the expert count and
    width (``EXPERT_CONFIG``)."""

    LINEARS: ClassVar[dict[str, str]] = {r: f"self_attn.{LINEAR_NAMES[r]}" for r in ATTN_ROLES}
    UNIT_KINDS: ClassVar[tuple[str, ...]] = ("block", "kv_group", "q_head", "expert", "expert_channel")
    UNIFORM_WIDTHS_ONLY = True
    MLP_CONFIG: ClassVar[str | None] = None  # no dense MLP (Qwen2-MoE: its shared expert's width)
    BIAS_FLAGS: ClassVar[dict[str, str]] = {}
    EXPERT_CONFIG: ClassVar[tuple[str, str]] = ("num_local_experts", "intermediate_size")
    ROUTER_PARAM: ClassVar[str] = f"{ROUTER}.weight"
    EXPERT_PARAMS: ClassVar[tuple[str, str]] = (GATE_UP, DOWN)

    @classmethod
    def is_moe(cls, layer: nn.Module) -> bool:
        return isinstance(getattr(cls.mlp(layer), "experts", None), nn.Module)

    def keep_blocks_config(self, keep: list[int]) -> None:
        """Qwen2/3-MoE build a plain dense MLP in the layers ``mlp_only_layers`` lists or ``decoder_sparse_step`` skips:
        after block removal the list is rewritten from the kept layers themselves (step 1), else a reload would put
        experts where a dense MLP was, or the reverse."""
        super().keep_blocks_config(keep)
        cfg = self.model.config
        if hasattr(cfg, "mlp_only_layers"):
            cfg.mlp_only_layers = [i for i, layer in enumerate(self.layers) if not self.is_moe(layer)]
            cfg.decoder_sparse_step = 1

    @classmethod
    def router(cls, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(ROUTER)

    @classmethod
    def experts(cls, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(EXPERTS)

    @classmethod
    def expert_weights(cls, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, H], down [E, H, I]) of a MoE layer."""
        return layer.get_parameter(GATE_UP), layer.get_parameter(DOWN)

    @classmethod
    def expert_ffn(cls, layer: nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e`` on tokens ``x`` [T, H]: (its down projection's input [T, I], its output [T, H])."""
        gate_up, down = cls.expert_weights(layer)
        gate, up = nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)
        h = cls.experts(layer).act_fn(gate) * up
        return h, nn.functional.linear(h, down[e])

    @classmethod
    def geometry(cls, layer: nn.Module) -> LayerGeometry:
        attn = cls.attention(layer)
        hd = attn.head_dim
        q, k = cls.linear(layer, "q"), cls.linear(layer, "k")
        moe: dict[str, int] = {}
        if cls.is_moe(layer):
            gate_up, _ = cls.expert_weights(layer)
            moe = {
                "experts": gate_up.shape[0],
                "expert_intermediate": gate_up.shape[1] // 2,
                "top_k": cls.router(layer).top_k,
            }
        return LayerGeometry(
            n_q=q.out_features // hd,
            n_kv=k.out_features // hd,
            head_dim=hd,
            intermediate=0,
            hidden=q.in_features,
            **moe,
        )

    @classmethod
    def members(cls, kind: str) -> tuple[Member, ...]:
        """Expert units name parameters (not linears): axis "out" cuts rows of a 2-D weight, "expert" slice e of a
        3-D tensor, "expert_out" / "expert_in" rows / columns inside every expert's slice."""
        if kind == "expert":
            return (
                Member(cls.ROUTER_PARAM, "out", _same),
                Member(GATE_UP, "expert", _same),
                Member(DOWN, "expert", _same),
            )
        if kind == "expert_channel":
            return (Member(GATE_UP, "expert_out", _gate_up_rows), Member(DOWN, "expert_in", _same))
        return super().members(kind)

    @classmethod
    def set_experts(cls, layer: nn.Module, n_experts: int, inter: int) -> None:
        """After surgery: the counts the router and the experts' forward read (surgery checks top-k first)."""
        router, experts = cls.router(layer), cls.experts(layer)
        router.num_experts = experts.num_experts = n_experts
        experts.intermediate_dim = inter

    @classmethod
    def set_expert_config(cls, config: Any, n_experts: int, inter: int) -> None:
        count, width = cls.EXPERT_CONFIG
        setattr(config, count, n_experts)
        setattr(config, width, inter)

    @classmethod
    def resize_layer(cls, layer: nn.Module, n_q: int, n_kv: int, inter: int) -> None:
        raise NotImplementedError(
            f"{cls.family} layers cannot differ in width (transformers reads the expert count "
            "and width from the shared config)"
        )
