"""GLM-4 (``glm4``, GLM-4-9B-0414 and its kin): Llama's attention names with a fused MLP input and norms on both sides
of each sublayer.

- ``mlp.gate_up_proj`` holds gate's rows, then up's (``Glm4MLP`` splits its output with ``chunk(2)``, i.e. by the
  tensor's own width, not the config's): an MLP channel is one member with a row map into both halves, and layers may
  differ in width (the prunelab loader rebuilds the fused linear at 2× the layer's width);
- four hidden-sized RMSNorms per layer: ``input_layernorm`` → attention → ``post_self_attn_layernorm`` → residual
  add, ``post_attention_layernorm`` → MLP → ``post_mlp_layernorm`` → residual add. A removed sublayer returns zeros,
  which its post-norm maps to zeros, so the sublayer can go; both of its norms go with it (``remove_sublayer``);
- partial rotary: only the first ``partial_rotary_factor``·head_dim dims of each head rotate (interleaved). Width units
  remove whole heads, so every kept head rotates as before;
- ``attention_bias`` (default true) puts biases on q/k/v only: o_proj and the MLP never have one, so bias/optimal
  compensation has nowhere a vanilla reload keeps (``no_output_bias``, and no bias flag to switch on).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

from prunelab.stages.arch import register_family
from prunelab.stages.arch.base import ArchAdapter, LayerGeometry, Member
from prunelab.stages.arch.facts import FamilyFacts, lazy_module

if TYPE_CHECKING:
    from torch import nn
else:  # imported on first use (stages.arch.facts: the facts above are read without torch)
    nn = lazy_module("torch.nn")

# The tiny model: head_dim ≠ hidden / heads, half of each head rotary (GLM-4's default), q/k/v biases, untied head.
register_family(FamilyFacts(model_types=("glm4",), adapter=f"{__name__}:Glm4Adapter", sublayers=True,
                            no_output_bias=("o", "down"), qkv_bias="attention_bias", layer_norms=4,
                            engines={"llama.cpp": "glm4"},
                            tiny={"head_dim": 24, "partial_rotary_factor": 0.5, "tie": False}))

GATE_UP = "mlp.gate_up_proj"


def _gate_up_rows(units: list[int], g: LayerGeometry) -> list[int]:
    """An MLP channel's rows of gate_up_proj: its gate row, then its up row."""
    return list(units) + [g.intermediate + c for c in units]


def _same(units: list[int], _g: LayerGeometry) -> list[int]:
    return list(units)


class Glm4Adapter(ArchAdapter):
    family = "GLM-4"
    LINEARS: ClassVar[dict[str, str]] = {**ArchAdapter.LINEARS, "gate": GATE_UP, "up": GATE_UP}
    LAYER_NORMS = ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm")
    # the norm after each sublayer (its output's): removed with it besides SUBLAYER_NORMS' norm before it, and counted
    # in the parameters its removal saves (ArchAdapter.sublayer_norms)
    POST_NORMS: ClassVar[dict[str, str]] = {"attention": "post_self_attn_layernorm", "mlp": "post_mlp_layernorm"}
    BIAS_FLAGS: ClassVar[dict[str, str]] = {}  # attention_bias adds q/k/v biases only: no output bias to switch on

    @classmethod
    def role_rows(cls, layer: nn.Module, role: str) -> slice | None:
        i = cls.geometry(layer).intermediate
        return {"gate": slice(0, i), "up": slice(i, 2 * i)}.get(role)

    @classmethod
    def geometry(cls, layer: nn.Module) -> LayerGeometry:
        g = super().geometry(layer)  # read the fused linear's rows as the MLP width: both halves
        return dataclasses.replace(g, intermediate=g.intermediate // 2)

    @classmethod
    def members(cls, kind: str) -> tuple[Member, ...]:
        if kind == "mlp_channel":
            return (Member(GATE_UP, "out", _gate_up_rows), Member(cls.LINEARS["down"], "in", _same))
        return super().members(kind)

    @classmethod
    def resize_layer(cls, layer: nn.Module, n_q: int, n_kv: int, inter: int) -> None:
        super().resize_layer(layer, n_q, n_kv, inter)
        if inter:  # the base built the fused linear for one of gate / up: it holds both
            old = layer.get_submodule(GATE_UP)
            cls.set_module(layer, GATE_UP, nn.Linear(old.in_features, 2 * inter, bias=old.bias is not None,
                                                     dtype=old.weight.dtype, device=old.weight.device))
