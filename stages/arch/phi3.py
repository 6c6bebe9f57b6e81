"""Phi-3: fused projections. ``self_attn.qkv_proj`` holds the rows of q (n_q·head_dim), then k and v
(n_kv·head_dim each); ``mlp.gate_up_proj`` holds gate's rows, then up's. A width unit's member in a fused
linear is one member with a row map into the fused rows (a KV group: its query heads' q rows, its k rows and
its v rows). transformers splits the fused output with the shared config's ``num_attention_heads``, so every
layer must keep the same widths (uniform allocation); no projection has a bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from prunelab.stages.arch import register_family
from prunelab.stages.arch.base import ArchAdapter, LayerGeometry, Member, heads_to_rows
from prunelab.stages.arch.facts import FamilyFacts

if TYPE_CHECKING:
    from torch import nn

register_family(FamilyFacts(model_types=("phi3",), adapter=f"{__name__}:Phi3Adapter", no_output_bias=("o", "down")))

QKV, GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"


def _q_rows(units: list[int], g: LayerGeometry) -> list[int]:
    return heads_to_rows(units, g.head_dim)


def _group_rows(groups: list[int], g: LayerGeometry) -> list[int]:
    """A KV group's rows of qkv_proj: its query heads' q rows, its k rows, its v rows."""
    heads = [h for grp in groups for h in range(grp * g.q_per_group, (grp + 1) * g.q_per_group)]
    q_end, k_end = g.n_q * g.head_dim, (g.n_q + g.n_kv) * g.head_dim
    kv = heads_to_rows(groups, g.head_dim)
    return heads_to_rows(heads, g.head_dim) + [q_end + r for r in kv] + [k_end + r for r in kv]


def _group_cols(groups: list[int], g: LayerGeometry) -> list[int]:
    return heads_to_rows([h for grp in groups for h in range(grp * g.q_per_group, (grp + 1) * g.q_per_group)], g.head_dim)


def _gate_up_rows(units: list[int], g: LayerGeometry) -> list[int]:
    return list(units) + [g.intermediate + c for c in units]


def _same(units: list[int], _g: LayerGeometry) -> list[int]:
    return list(units)


class Phi3Adapter(ArchAdapter):
    family = "Phi-3"
    LINEARS: ClassVar[dict[str, str]] = {"q": QKV, "k": QKV, "v": QKV, "o": "self_attn.o_proj",
                                         "gate": GATE_UP, "up": GATE_UP, "down": "mlp.down_proj"}
    UNIFORM_WIDTHS_ONLY = True

    BIAS_FLAGS: ClassVar[dict[str, str]] = {}

    @classmethod
    def geometry(cls, layer: nn.Module) -> LayerGeometry:
        attn = cls.attention(layer)
        hd, n_kv = attn.head_dim, attn.num_key_value_heads
        qkv = layer.get_submodule(QKV)
        return LayerGeometry(n_q=qkv.out_features // hd - 2 * n_kv, n_kv=n_kv, head_dim=hd,
                             intermediate=layer.get_submodule(GATE_UP).out_features // 2, hidden=qkv.in_features)

    @classmethod
    def role_rows(cls, layer: nn.Module, role: str) -> slice | None:
        g = cls.geometry(layer)
        q, kv, i = g.n_q * g.head_dim, g.n_kv * g.head_dim, g.intermediate
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv),
                "gate": slice(0, i), "up": slice(i, 2 * i)}.get(role)

    @classmethod
    def linear(cls, layer: nn.Module, role: str) -> nn.Linear:
        return layer.get_submodule(cls.LINEARS[role])

    @classmethod
    def members(cls, kind: str) -> tuple[Member, ...]:
        o, down = cls.LINEARS["o"], cls.LINEARS["down"]
        if kind == "mlp_channel":
            return (Member(GATE_UP, "out", _gate_up_rows), Member(down, "in", _same))
        if kind == "q_head":
            return (Member(QKV, "out", _q_rows), Member(o, "in", _q_rows))
        if kind == "kv_group":
            return (Member(QKV, "out", _group_rows), Member(o, "in", _group_cols))
        raise KeyError(f"{cls.__name__} has no width unit kind {kind!r}")

    @classmethod
    def set_attention_groups(cls, layer: nn.Module, n_q: int, n_kv: int) -> None:
        attn = cls.attention(layer)
        attn.num_key_value_groups, attn.num_key_value_heads = n_q // n_kv, n_kv

    @classmethod
    def resize_layer(cls, layer: nn.Module, n_q: int, n_kv: int, inter: int) -> None:
        raise NotImplementedError("Phi-3 layers cannot differ in width (the fused split reads the shared config)")

