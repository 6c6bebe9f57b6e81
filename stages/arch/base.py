"""The adapter protocol: everything prunelab needs to know about one model family's module layout.

An adapter answers, for one family: where the blocks, embeddings, final norm and head are; how to run
one block on cached inputs (masks, rotary embeddings, sliding-window layers); each layer's geometry;
for every width unit kind its **members** ``(module path, axis, index map)``; which linears LoRA
targets; which output projections can hold the bias that bias/optimal compensation adds; and how to
rebuild a layer at new widths. The rest of prunelab asks the adapter and never spells a module name.

Subclasses describe a layout with the class attributes below (module paths inside a decoder layer,
keyed by *role*): ``q k v o`` (attention projections), ``gate up down`` (MLP projections).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import prunelab.stages.arch as arch_tables  # its tables are derived on every read
from prunelab.stages.arch.base_names import HEAD_NAME, LINEAR_NAMES
from prunelab.stages.arch.facts import lazy_module
from prunelab.stages.core.compat import cache_kwargs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunelab.stages.arch.facts import FamilyFacts
else:  # imported on first use: family files subclass ArchAdapter and are read for their facts without torch
    torch, nn = lazy_module("torch"), lazy_module("torch.nn")

ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
ROLES = ATTN_ROLES + MLP_ROLES
# Statistics slots: the inputs of the projections with these roles are observed during calibration
# (o/down: the channels width units own; q/gate: OWL's outlier ratios). The slot names are the ones
# run directories of version 1 saved them under, so resumed runs read the same keys.
OBSERVED_ROLES = ("o", "down", "q", "gate")
STAT_KEYS = {"o": "o_proj", "down": "down_proj", "q": "q_proj", "gate": "gate_proj"}
# Roles that share an observed input (q, k, v read what q reads; gate and up what gate reads).
INPUT_OF = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}


@dataclass(frozen=True)
class LayerGeometry:
    n_q: int
    n_kv: int
    head_dim: int
    intermediate: int
    hidden: int
    # mixture of experts (0 on dense layers): routed experts, each expert's intermediate width, experts per token
    experts: int = 0
    expert_intermediate: int = 0
    top_k: int = 0

    @property
    def q_per_group(self) -> int:
        return self.n_q // self.n_kv

    def params_per_kv_group(self) -> int:
        """q rows + k rows + v rows + o columns of one group (biases ignored)."""
        return self.hidden * self.head_dim * (2 * self.q_per_group + 2)

    def params_per_q_head(self) -> int:
        return 2 * self.hidden * self.head_dim

    def params_per_mlp_channel(self) -> int:
        return 3 * self.hidden

    def params_per_expert(self) -> int:
        """gate/up rows, down columns and the router row of one expert."""
        return 3 * self.hidden * self.expert_intermediate + self.hidden


def heads_to_rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


@dataclass(frozen=True)
class Member:
    """One coupled piece of a width unit: a linear inside a decoder layer, the axis cut ("out": output rows
    and bias entries, "in": input columns) and the index map from unit indices to rows/columns. "norm": an RMSNorm
    over a whole projection's output (OLMo 2's q_norm / k_norm) loses the same entries, and its kept weights are
    rescaled by sqrt(D/D') so that it divides by what it divided by before (as the hidden-channel rescale does); the
    projection feeding it (the adapter's ``NORM_INPUTS``) keeps ε exact (``prunelab.stages.surgery.apply``)."""

    path: str
    axis: str
    index: Callable[[list[int], LayerGeometry], list[int]]


def _kv_to_q_rows(groups: list[int], g: LayerGeometry) -> list[int]:
    return heads_to_rows([h for grp in groups for h in range(grp * g.q_per_group, (grp + 1) * g.q_per_group)], g.head_dim)


def _heads(units: list[int], g: LayerGeometry) -> list[int]:
    return heads_to_rows(units, g.head_dim)


def _same(units: list[int], _g: LayerGeometry) -> list[int]:
    return list(units)


def _replace(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, name, module)


@dataclass
class BlockInputs:
    """What every block needs besides the hidden state; computed once per batch."""

    masks: dict[str, Any]
    position_embeddings: Any  # rotary (cos, sin); Gemma: one pair per layer type, keyed by it
    position_ids: torch.Tensor


class ArchAdapter:
    """Block-level and unit-level access to a decoder-only ``*ForCausalLM``. Defaults: the Llama layout."""

    # set from the family's registered facts when the adapter is resolved (stages.arch._bind), never by hand:
    # FACTS, model_types, SUBLAYER_REMOVAL, BIAS_HOLDERS
    FACTS: ClassVar[FamilyFacts | None] = None
    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    BLOCKS: ClassVar[str] = "model.layers"
    EMBED: ClassVar[str] = "model.embed_tokens"
    NORM: ClassVar[str] = "model.norm"
    HEAD: ClassVar[str] = HEAD_NAME
    ROTARY: ClassVar[str] = "model.rotary_emb"
    ATTN: ClassVar[str] = "self_attn"
    MLP: ClassVar[str] = "mlp"
    LINEARS: ClassVar[dict[str, str]] = {r: f"{'self_attn' if r in ATTN_ROLES else 'mlp'}.{n}" for r, n in LINEAR_NAMES.items()}
    # Output projections that may carry a bias a vanilla reload keeps, and the config flags that switch biases on.
    BIAS_HOLDERS: ClassVar[dict[str, bool]] = {"o": True, "down": True}
    BIAS_FLAGS: ClassVar[dict[str, str]] = {"attn": "attention_bias", "mlp": "mlp_bias"}
    # hidden-sized norms inside a layer (hidden-channel pruning slices them)
    LAYER_NORMS: ClassVar[tuple[str, ...]] = ("input_layernorm", "post_attention_layernorm")
    # per-head norms (Qwen3's q_norm / k_norm): over head_dim, untouched by width units
    HEAD_NORMS: ClassVar[tuple[str, ...]] = ()
    # the role of the projection each HEAD_NORMS entry normalises: an RMSNorm's output does not change when its input
    # is scaled, except through ε, so scaling that projection's rows moves the norm's effective ε (surgery uses it to
    # keep removal exact when a norm's ε or width changes)
    NORM_INPUTS: ClassVar[dict[str, str]] = {}
    # RMSNorms multiply by (NORM_OFFSET + weight): 0 for Llama's w, 1 for Gemma's (1 + w)
    NORM_OFFSET: ClassVar[float] = 0.0
    UNIT_KINDS: ClassVar[tuple[str, ...]] = ("block", "kv_group", "q_head", "mlp_channel", "hidden_channel")
    # transformers reads per-layer widths from the shared config (Phi-3's fused split): no heterogeneous widths
    UNIFORM_WIDTHS_ONLY: ClassVar[bool] = False
    # the config key transformers reads the MLP width (the ``mlp_channel`` unit's count) from; None: no dense MLP
    MLP_CONFIG: ClassVar[str | None] = "intermediate_size"
    # sublayer removal (He et al., arXiv 2406.15786): families whose decoder layer adds each sublayer's output to the
    # residual stream, so a sublayer returning zeros (stages.arch.noop) is a removed one; the norm that only feeds a
    # sublayer (or, post-norm families, only normalises its output) goes with it; MID_RESIDUAL: the module whose
    # input is the residual stream between the attention and the MLP sublayer
    SUBLAYER_REMOVAL: ClassVar[bool] = False
    SUBLAYER_NORMS: ClassVar[dict[str, str]] = {"attention": "input_layernorm", "mlp": "post_attention_layernorm"}
    # sandwich-norm families (GLM-4): the norm after each sublayer (of its output only), which goes with it too
    POST_NORMS: ClassVar[dict[str, str]] = {}
    MID_RESIDUAL: ClassVar[str] = "post_attention_layernorm"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ------------------------------------------------------------------ names (class level: no model needed)
    @classmethod
    def linear_name(cls, role: str) -> str:
        """The last component of a role's module path (what LoRA's ``target_modules`` matches)."""
        return cls.LINEARS[role].rsplit(".", 1)[-1]

    @classmethod
    def lora_targets(cls) -> list[str]:
        """Module names LoRA may target: every decoder linear, a fused one once (the head is ``head_name()``)."""
        return [p.rsplit(".", 1)[-1] for p in cls.linear_paths()]

    @classmethod
    def lora_modules(cls, requested: list[str]) -> list[str]:
        """``requested`` target names (the Llama-layout role names recipes use, or this family's own) as this
        family's module names: on a fused layout ``q_proj``/``k_proj``/``v_proj`` all mean ``qkv_proj``."""
        by_llama_name = {LINEAR_NAMES[r]: cls.linear_name(r) for r in cls.roles()}
        absent = {LINEAR_NAMES[r] for r in ROLES if r not in cls.LINEARS}  # MoE: no dense MLP linears to target
        return list(dict.fromkeys(by_llama_name.get(name, name) for name in requested if name not in absent))

    @classmethod
    def roles(cls) -> list[str]:
        """The roles this family has a linear for (MoE families: attention only; experts are fused tensors)."""
        return [r for r in ROLES if r in cls.LINEARS]

    @classmethod
    def linear_paths(cls) -> list[str]:
        """Every decoder linear's path inside a layer, once (a fused ``qkv_proj`` serves three roles), in role order."""
        return list(dict.fromkeys(cls.LINEARS[r] for r in cls.roles()))

    @classmethod
    def distinct_roles(cls) -> list[str]:
        """One role per distinct linear, in role order (a fused qkv_proj once, under q)."""
        seen: dict[str, str] = {}
        for role in cls.roles():
            seen.setdefault(cls.LINEARS[role], role)
        return list(seen.values())

    @classmethod
    def output_paths(cls) -> set[str]:
        """The linears whose output rows are hidden channels (the attention and MLP output projections)."""
        return {cls.LINEARS[r] for r in ("o", "down") if r in cls.LINEARS}

    @classmethod
    def role_rows(cls, layer: nn.Module, role: str) -> slice | None:
        """The rows of a fused member that hold ``role`` (None: the member is the role's own linear)."""
        return None

    @classmethod
    def head_name(cls) -> str:
        return cls.HEAD

    @classmethod
    def block_prefix(cls, index: int) -> str:
        return f"{cls.BLOCKS}.{index}"

    @classmethod
    def param_name(cls, index: int, role: str, what: str = "weight") -> str:
        """Full parameter name of a role's weight/bias in block ``index``."""
        return f"{cls.BLOCKS}.{index}.{cls.LINEARS[role]}.{what}"

    @classmethod
    def role_of(cls, path: str) -> str | None:
        """The role of a module path inside a layer (``None`` if it is not a decoder linear)."""
        for role, p in cls.LINEARS.items():
            if path == p:
                return role
        return None

    @classmethod
    def is_block_param(cls, name: str) -> bool:
        return name.startswith(cls.BLOCKS + ".")

    @classmethod
    def block_index(cls, name: str) -> int | None:
        """The block a parameter (or checkpoint tensor) name belongs to; None outside the blocks."""
        return int(name[len(cls.BLOCKS) + 1:].split(".", 1)[0]) if cls.is_block_param(name) else None

    @classmethod
    def is_rotary_buffer(cls, name: str) -> bool:
        """Whether a state-dict name is a rotary embedding's buffer (recomputed from the config, never a weight:
        a checkpoint may hold it or not)."""
        return cls.ROTARY.rsplit(".", 1)[-1] in name

    @classmethod
    def head_param(cls) -> str:
        return f"{cls.HEAD}.weight"

    @classmethod
    def bias_holders(cls, config: Any) -> dict[str, bool]:
        """Whether the output projections (``"o"``, ``"down"``) can carry a bias that a vanilla
        ``from_pretrained`` reload keeps — where bias and optimal compensation put their shift."""
        return dict(cls.BIAS_HOLDERS)

    @classmethod
    def bias_flags(cls) -> dict[str, str]:
        """Config flag that switches on the biases of a sublayer's projections (Llama: all four / all three)."""
        return dict(cls.BIAS_FLAGS)

    # ------------------------------------------------------------------ structure
    @property
    def inner(self) -> nn.Module:
        return self.model.get_submodule(self.BLOCKS.rsplit(".", 1)[0])

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.BLOCKS)

    def set_layers(self, layers: list[nn.Module] | nn.ModuleList) -> None:
        parent, name = self.BLOCKS.rsplit(".", 1)
        setattr(self.model.get_submodule(parent), name, layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(layers))

    def keep_blocks_config(self, keep: list[int]) -> None:
        """After ``set_layers`` with the blocks ``keep`` (old indices): the config's per-layer entries follow them, so a
        vanilla reload builds each kept layer as it was (Gemma's ``layer_types``)."""
        cfg = self.model.config
        cfg.num_hidden_layers = len(keep)
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [cfg.layer_types[i] for i in keep]

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_submodule(self.EMBED)

    def set_embedding(self, module: nn.Module) -> None:
        parent, name = self.EMBED.rsplit(".", 1)
        setattr(self.model.get_submodule(parent), name, module)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.NORM)

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.HEAD)

    def set_head(self, module: nn.Module) -> None:
        setattr(self.model, self.HEAD, module)

    def block_param_counts(self) -> list[int]:
        return [sum(p.numel() for p in layer.parameters()) for layer in self.layers]

    def total_params(self) -> int:
        """All parameters, embeddings and head included, tied weights counted once (as papers count)."""
        return sum(p.numel() for p in self.model.parameters())

    def reset_rotary(self, config: Any, device: Any) -> None:
        parent, name = self.ROTARY.rsplit(".", 1)
        owner = self.model.get_submodule(parent)
        setattr(owner, name, type(getattr(owner, name))(config=config).to(device))

    # ------------------------------------------------------------------ layer level
    @classmethod
    def linear(cls, layer: nn.Module, role: str) -> nn.Linear:
        return layer.get_submodule(cls.LINEARS[role])

    @classmethod
    def set_linear(cls, layer: nn.Module, role: str, module: nn.Module) -> None:
        cls.set_module(layer, cls.LINEARS[role], module)

    @staticmethod
    def set_module(layer: nn.Module, path: str, module: nn.Module) -> None:
        parent, name = path.rsplit(".", 1)
        setattr(layer.get_submodule(parent), name, module)

    @classmethod
    def linears(cls, layer: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
        for role in cls.roles():
            yield role, cls.linear(layer, role)

    @classmethod
    def attention(cls, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(cls.ATTN)

    @classmethod
    def mlp(cls, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(cls.MLP)

    @classmethod
    def has_sublayer(cls, layer: nn.Module, which: str) -> bool:
        """Whether ``layer`` still has its ``attention`` / ``mlp`` sublayer (False once removed)."""
        from prunelab.stages.arch.noop import NoAttention, NoMLP  # lazy: torch-free

        return not isinstance(cls.attention(layer) if which == "attention" else cls.mlp(layer), (NoAttention, NoMLP))

    @classmethod
    def remove_sublayer(cls, layer: nn.Module, which: str) -> None:
        """Replace the ``attention`` or ``mlp`` sublayer (and the norm that serves only it) by a parameter-free no-op."""
        from prunelab.stages.arch.noop import NoAttention, NoMLP  # lazy: torch-free

        if not cls.SUBLAYER_REMOVAL:
            raise NotImplementedError(f"{cls.family or cls.__name__}: removing a whole sublayer is supported for the "
                                      f"Llama-layout families ({', '.join(arch_tables.SUBLAYER_FAMILIES)}) only")
        if which not in cls.SUBLAYER_NORMS:
            raise ValueError(f"sublayer {which!r}: choose attention or mlp")
        if which == "attention":
            attn = cls.attention(layer)
            hidden = cls.linear(layer, "o").out_features if cls.has_sublayer(layer, "attention") else attn.hidden_size
            stand_in: nn.Module = NoAttention(attn.layer_idx, attn.head_dim, hidden)
            _replace(layer, cls.ATTN, stand_in)
        else:
            hidden = cls.linear(layer, "down").out_features if cls.has_sublayer(layer, "mlp") else cls.mlp(layer).hidden_size
            _replace(layer, cls.MLP, NoMLP(hidden))
        for norm in cls.sublayer_norms(which):
            _replace(layer, norm, nn.Identity())

    @classmethod
    def sublayer_norms(cls, which: str) -> tuple[str, ...]:
        """The norms that serve only the ``attention`` / ``mlp`` sublayer (the one before it, and the one after it
        where the family has one): removed with it, so they count in its parameters (selection.sublayers)."""
        return (cls.SUBLAYER_NORMS[which], *((cls.POST_NORMS[which],) if which in cls.POST_NORMS else ()))

    def sublayer_params(self) -> dict[tuple[str, int], int]:
        """Parameters each present sublayer takes with it: its module and the norms that serve only it (two for
        GLM-4's sandwich norms: ``sublayer_norms``). Here, not in selection, because criteria (``sublayer_sleb``'s
        budget) and selection both read it."""
        out: dict[tuple[str, int], int] = {}
        for i, layer in enumerate(self.layers):
            for which, module in (("attention", self.attention(layer)), ("mlp", self.mlp(layer))):
                if not self.has_sublayer(layer, which):
                    continue
                norms = [layer.get_submodule(n) for n in self.sublayer_norms(which)]
                out[which, i] = sum(p.numel() for m in (module, *norms) for p in m.parameters())
        return out

    @classmethod
    def layer_norms(cls, layer: nn.Module) -> list[nn.Module]:
        return [layer.get_submodule(n) for n in cls.LAYER_NORMS]

    @classmethod
    def head_norms(cls, layer: nn.Module) -> list[nn.Module]:
        """Norms inside attention whose width is not the hidden size (per-head, or over a whole projection); they
        read the config's eps, so hidden-channel pruning's eps rescale reaches them on reload too."""
        return [layer.get_submodule(n) for n in cls.HEAD_NORMS]

    def hidden_embedding(self, weight: torch.Tensor, padding_idx: int | None, d_before: int) -> nn.Module:
        """The token embedding after hidden-channel pruning, holding ``weight`` (the kept columns). Families that
        scale embeddings by a function of the hidden size (Gemma) rebuild their own module and rescale it."""
        new = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding_idx, device=weight.device, dtype=weight.dtype)
        new.weight.data.copy_(weight)
        return new

    def embedding_rescale(self, d_before: int, d_after: int) -> float:
        """What ``hidden_embedding`` multiplied the kept embedding weights by (1: nothing)."""
        return 1.0

    @classmethod
    def geometry(cls, layer: nn.Module) -> LayerGeometry:
        attn = cls.attention(layer)
        head_dim = attn.head_dim
        has_attn, has_mlp = cls.has_sublayer(layer, "attention"), cls.has_sublayer(layer, "mlp")
        if not (has_attn and has_mlp):  # a removed sublayer: 0 heads / 0 channels (prunelab_layer_shapes' convention)
            hidden = cls.linear(layer, "q").in_features if has_attn else attn.hidden_size
            return LayerGeometry(n_q=cls.linear(layer, "q").out_features // head_dim if has_attn else 0,
                                 n_kv=cls.linear(layer, "k").out_features // head_dim if has_attn else 0, head_dim=head_dim,
                                 intermediate=cls.linear(layer, "gate").out_features if has_mlp else 0, hidden=hidden)
        q, k = cls.linear(layer, "q"), cls.linear(layer, "k")
        return LayerGeometry(n_q=q.out_features // head_dim, n_kv=k.out_features // head_dim, head_dim=head_dim,
                             intermediate=cls.linear(layer, "gate").out_features, hidden=q.in_features)

    def geometries(self) -> list[LayerGeometry]:
        return [self.geometry(layer) for layer in self.layers]

    @classmethod
    def members(cls, kind: str) -> tuple[Member, ...]:
        """The coupled members of a width unit kind (``kv_group``, ``q_head``, ``mlp_channel``)."""
        p = cls.LINEARS
        if kind == "mlp_channel":
            return (Member(p["gate"], "out", _same), Member(p["up"], "out", _same), Member(p["down"], "in", _same))
        if kind == "q_head":
            return (Member(p["q"], "out", _heads), Member(p["o"], "in", _heads))
        if kind == "kv_group":
            return (Member(p["q"], "out", _kv_to_q_rows), Member(p["k"], "out", _heads), Member(p["v"], "out", _heads),
                    Member(p["o"], "in", _kv_to_q_rows))
        raise KeyError(f"{cls.__name__} has no width unit kind {kind!r}")

    @classmethod
    def set_attention_groups(cls, layer: nn.Module, n_q: int, n_kv: int) -> None:
        cls.attention(layer).num_key_value_groups = n_q // n_kv

    @classmethod
    def set_intermediate(cls, layer: nn.Module, inter: int) -> None:
        mlp = cls.mlp(layer)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter

    @classmethod
    def set_layer_hidden(cls, layer: nn.Module, hidden: int) -> None:
        for obj in (layer, cls.attention(layer), cls.mlp(layer)):
            if hasattr(obj, "hidden_size"):
                obj.hidden_size = hidden

    @classmethod
    def resize_layer(cls, layer: nn.Module, n_q: int, n_kv: int, inter: int) -> None:
        """Rebuild a layer's linears (empty) at new widths — the loader fills them from a checkpoint."""
        hd = cls.attention(layer).head_dim
        hidden = cls.linear(layer, "q").in_features

        def linear(i: int, o: int, like: nn.Linear) -> nn.Linear:
            return nn.Linear(i, o, bias=like.bias is not None, dtype=like.weight.dtype, device=like.weight.device)

        sizes = {"q": (hidden, n_q * hd), "k": (hidden, n_kv * hd), "v": (hidden, n_kv * hd), "o": (n_q * hd, hidden),
                 "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
        gone = {"attention"} if n_q == 0 and n_kv == 0 else set()  # 0 heads / 0 channels: a removed sublayer
        gone |= {"mlp"} if inter == 0 else set()
        for role in ROLES:
            if ("attention" if role in ATTN_ROLES else "mlp") not in gone:
                cls.set_linear(layer, role, linear(*sizes[role], cls.linear(layer, role)))
        if "attention" not in gone:
            cls.set_attention_groups(layer, n_q, n_kv)
        if "mlp" not in gone:
            cls.set_intermediate(layer, inter)
        for which in sorted(gone):
            cls.remove_sublayer(layer, which)

    @classmethod
    def hidden_layer_members(cls) -> tuple[tuple[str, int], ...]:
        """(parameter suffix inside a decoder layer, axis of the hidden dimension) of the hidden-channel unit:
        1 = input column, 0 = output row / vector."""
        out: list[tuple[str, int]] = [(f"{n}.weight", 0) for n in cls.LAYER_NORMS]
        for path in cls.linear_paths():
            out += [(f"{path}.weight", 0), (f"{path}.bias", 0)] if path in cls.output_paths() else [(f"{path}.weight", 1)]
        return tuple(out)

    def hidden_members(self) -> list[tuple[str, torch.Tensor, int]]:
        """(parameter name, tensor, hidden axis) of every member of the hidden-channel group; tied weights once."""
        params = dict(self.model.named_parameters())  # lists a tied head only once (as the embedding)
        out = [(f"{self.EMBED}.weight", params[f"{self.EMBED}.weight"], 1)]
        if f"{self.HEAD}.weight" in params:
            out.append((f"{self.HEAD}.weight", params[f"{self.HEAD}.weight"], 1))
        out.append((f"{self.NORM}.weight", params[f"{self.NORM}.weight"], 0))
        for i in range(self.num_blocks):
            for suffix, axis in self.hidden_layer_members():
                name = f"{self.block_prefix(i)}.{suffix}"
                if name in params:
                    out.append((name, params[name], axis))
        return out

    # ------------------------------------------------------------------ block-wise forward
    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids.to(self.device))

    def prepare(self, hidden: torch.Tensor) -> BlockInputs:
        """Causal masks (per attention type) and rotary embeddings for a batch without padding."""
        # lazy: torch-free
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        cfg = self.model.config
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs = {"config": cfg, "inputs_embeds": hidden, "attention_mask": None, **cache_kwargs(create_causal_mask),
                  "position_ids": position_ids}
        masks: dict[str, Any] = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return BlockInputs(masks, self.position_embeddings(hidden, position_ids), position_ids)

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """The rotary (cos, sin) every block reads (Gemma 3: one pair per layer type)."""
        return self.model.get_submodule(self.ROTARY)(hidden, position_ids=position_ids)

    def run_block(self, index: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
        layer = self.layers[index]
        kind = getattr(layer, "attention_type", "full_attention")
        out = layer(
            hidden,
            attention_mask=inputs.masks.get(kind, inputs.masks["full_attention"]),
            position_embeddings=inputs.position_embeddings,
            position_ids=inputs.position_ids,
            use_cache=False,
        )
        return out[0] if isinstance(out, tuple) else out

    def boundary_states(self, input_ids: torch.Tensor, skip: frozenset[int] = frozenset()) -> list[torch.Tensor]:
        """Hidden states at every block boundary: [x_0 (embeddings), x_1, ..., x_L] for the kept blocks."""
        hidden = self.embed(input_ids)
        inputs = self.prepare(hidden)
        states = [hidden]
        for i in range(self.num_blocks):
            if i in skip:
                continue
            hidden = self.run_block(i, hidden, inputs)
            states.append(hidden)
        return states

    def final_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's final-normed hidden states (embeddings, every block, the final norm), without the head: the
        base model's own forward, so hooks on its modules see an ordinary pass and the head's (tokens × vocab) logits
        are never materialised."""
        return self.inner(input_ids=input_ids, use_cache=False).last_hidden_state

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """The head applied to final-normed states (families with logit scaling or soft-capping override it)."""
        return self.head(normed)

    def nll_sum(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL and predicted-token count for a batch (see ``nll_per_sequence``)."""
        ids = input_ids.to(hidden.device)
        return self.nll_per_sequence(hidden, ids).sum().item(), ids[:, 1:].numel()

    def nll_per_sequence(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, chunk_tokens: int = 128, normed: bool = False
    ) -> torch.Tensor:
        """Summed next-token NLL of every sequence in the batch (float64): final norm (unless the state
        is already ``normed``) → LM head → cross-entropy, chunked over rows so the (tokens × vocab)
        logits stay small for 50k–150k vocabularies."""
        batch, length = input_ids.shape
        normed = (hidden if normed else self.final_norm(hidden))[:, :-1].reshape(-1, hidden.shape[-1])
        labels = input_ids[:, 1:].reshape(-1)
        losses = torch.empty(labels.numel(), dtype=torch.float64, device=hidden.device)
        for s in range(0, labels.numel(), chunk_tokens):
            logits = self.logits(normed[s : s + chunk_tokens]).float()
            losses[s : s + chunk_tokens] = torch.nn.functional.cross_entropy(
                logits, labels[s : s + chunk_tokens], reduction="none"
            ).double()
        return losses.view(batch, length - 1).sum(-1)
