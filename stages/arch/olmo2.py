"""OLMo 2: Llama's projection names, norms after the sublayers instead of before, and q/k RMSNorms over the whole
projection.

- ``post_attention_layernorm`` / ``post_feedforward_layernorm`` normalise each sublayer's output before it joins
  the residual stream (there is no input norm): both are hidden-sized, and the hidden-channel rescale covers them;
- ``self_attn.q_norm`` normalises all n_q·head_dim query channels at once (``k_norm`` all n_kv·head_dim key
  channels), so removing heads changes what it divides by. The norm is a member of the query-head and KV-group
  units (axis ``"norm"``): it loses the removed heads' entries and its kept weights are scaled by sqrt(D/D'), which
  restores the divisor; q_proj's / k_proj's kept rows are scaled by sqrt(D'/D), which keeps its ε exact too (see
  ``prunelab.stages.surgery.apply._slice_projection_norm``) — removal equals masking;
- ``attention_bias`` switches q/k/v/o biases on; the MLP has none (down_proj cannot hold compensation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from prunelab.stages.arch import register_family
from prunelab.stages.arch.base import ArchAdapter, LayerGeometry, Member, heads_to_rows
from prunelab.stages.arch.facts import FamilyFacts

if TYPE_CHECKING:
    from torch import nn

# post-norms: each goes with the sublayer whose output it normalises, so sublayers can be removed
register_family(FamilyFacts(model_types=("olmo2",), adapter=f"{__name__}:Olmo2Adapter", sublayers=True,
                            no_output_bias=("down",), qk_norm="projection", tiny={"head_dim": 24}))

Q_NORM, K_NORM = "self_attn.q_norm", "self_attn.k_norm"


def _q_rows_of_groups(groups: list[int], g: LayerGeometry) -> list[int]:
    return heads_to_rows([h for grp in groups for h in range(grp * g.q_per_group, (grp + 1) * g.q_per_group)], g.head_dim)


def _heads(units: list[int], g: LayerGeometry) -> list[int]:
    return heads_to_rows(units, g.head_dim)


class Olmo2Adapter(ArchAdapter):
    family = "OLMo 2"
    LAYER_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
    HEAD_NORMS = (Q_NORM, K_NORM)  # read the config's eps (hidden-channel pruning rescales it)
    NORM_INPUTS: ClassVar[dict[str, str]] = {Q_NORM: "q", K_NORM: "k"}
    SUBLAYER_NORMS: ClassVar[dict[str, str]] = {"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}
    MID_RESIDUAL = "mlp"

    BIAS_FLAGS: ClassVar[dict[str, str]] = {"attn": "attention_bias"}

    @classmethod
    def members(cls, kind: str) -> tuple[Member, ...]:
        base = super().members(kind)
        if kind == "q_head":
            return (*base, Member(Q_NORM, "norm", _heads))
        if kind == "kv_group":
            return (*base, Member(Q_NORM, "norm", _q_rows_of_groups), Member(K_NORM, "norm", _heads))
        return base

    @classmethod
    def resize_layer(cls, layer: nn.Module, n_q: int, n_kv: int, inter: int) -> None:
        super().resize_layer(layer, n_q, n_kv, inter)
        if not cls.has_sublayer(layer, "attention"):
            return
        hd = cls.attention(layer).head_dim
        for path, size in ((Q_NORM, n_q * hd), (K_NORM, n_kv * hd)):
            old = layer.get_submodule(path)
            cls.set_module(layer, path, type(old)(size, old.variance_epsilon).to(old.weight.device, old.weight.dtype))

