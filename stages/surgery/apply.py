"""Surgery: the only code that edits weights or architecture. It executes a plan; it never decides.

A plan is a typed record (``prunelab.stages.surgery.plan``) saved as ``plan.json``. ``apply_plan`` applied to a fresh copy
of the same model gives the same weights, which is what makes a run resumable and a plan reviewable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunelab.stages.arch import adapter_for, compensation_refusal, layer_adapter
from prunelab.stages.arch.base import ArchAdapter
from prunelab.stages.surgery.experts import prune_layer_experts
from prunelab.stages.surgery.merge import rdsc_merge
from prunelab.stages.surgery.plan import DepthPlan, HiddenPlan, PlanError, SublayerPlan, WidthPlan, load_plan
from prunelab.stages.surgery.sublayers import remove_sublayers

__all__ = ["PlanError", "apply_plan", "merge_blocks", "prune_hidden", "prune_layer_width", "remove_blocks"]


def apply_plan(model: nn.Module, plan: DepthPlan | WidthPlan | HiddenPlan | dict[str, Any],
               side: dict[str, Any] | None = None) -> nn.Module:
    """Apply ``plan`` (a typed plan, or ``plan.json``'s mapping, validated first) and its side tensors (e.g.
    compensation) to ``model`` in place."""
    plan = load_plan(plan)
    if isinstance(plan, DepthPlan):
        if plan.merges:
            merge_blocks(model, [m.model_dump(by_alias=True) for m in plan.merges], expected_layers=plan.layers_before)
        remove_blocks(model, plan.removed_blocks, expected_layers=plan.layers_before)
        return model
    _check_shapes(model, plan.shapes_before)
    if isinstance(plan, SublayerPlan):
        remove_sublayers(model, plan.removed_attention, plan.removed_mlp)
        set_width_config(model, [sh.model_dump(exclude_none=True) for sh in plan.shapes_after])
        return model
    if isinstance(plan, HiddenPlan):
        h = plan.hidden
        if model.config.hidden_size != h.hidden_before:
            raise PlanError(f"plan was made for hidden_size {h.hidden_before}, this model has {model.config.hidden_size}")
        prune_hidden(model, h.removed, h.norm_rescale)
        if plan.shapes_after is not None:
            set_width_config(model, [s.model_dump(exclude_none=True) for s in plan.shapes_after])
        return model
    apply_width(model, plan, side or {})
    return model


def _check_shapes(model: nn.Module, before: list[Any] | None) -> None:
    if before is not None:
        now = adapter_for(model).geometries()
        got = [{"num_attention_heads": g.n_q, "num_key_value_heads": g.n_kv, "intermediate_size": g.intermediate,
                **({"num_experts": g.experts, "expert_intermediate_size": g.expert_intermediate} if g.experts else {})}
               for g in now]
        if got != [s.model_dump(exclude_none=True) for s in before]:
            raise PlanError("plan was made for a model with other layer widths (already pruned?)")


def apply_width(model: nn.Module, plan: WidthPlan, side: dict[str, Any]) -> None:
    ad = adapter_for(model)
    if ad.UNIFORM_WIDTHS_ONLY and any(s != plan.shapes_after[0] for s in plan.shapes_after):
        raise PlanError(f"{ad.family} reads its head counts (and expert count and width) from the shared config, so "
                        "its layers cannot differ in width; use a uniform allocation (layer_ratio, allocation: uniform)")
    for key, removed in plan.layers.items():
        prune_layer_width(ad.layers[int(key)], removed.model_dump(), type(ad))
        if removed.experts or removed.expert_channels:
            prune_layer_experts(ad.layers[int(key)], removed.experts, removed.expert_channels, type(ad))
    weights = {k: v for k, v in side.items() if k.endswith(".weight")}
    biases = {k: v for k, v in side.items() if k.endswith(".bias")}
    if weights:
        replace_weights(model, weights)
    if biases:
        add_output_biases(model, biases)
    set_width_config(model, [s.model_dump(exclude_none=True) for s in plan.shapes_after])


def replace_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Overwrite sliced weights with compensated ones (optimal compensation), checking every shape."""
    params = dict(model.named_parameters())
    for key, value in weights.items():
        if key not in params:
            raise PlanError(f"side tensor {key} names no parameter of this model")
        if tuple(params[key].shape) != tuple(value.shape):
            raise PlanError(f"side tensor {key} has shape {tuple(value.shape)}, the pruned parameter {tuple(params[key].shape)}")
        params[key].data.copy_(value.to(params[key].device, params[key].dtype))


def merge_blocks(model: nn.Module, merges: list[dict[str, Any]], expected_layers: int | None = None) -> None:
    """LaCo's RDSC merges, in plan order, before the absorbed blocks are removed (indices are the original ones)."""
    layers = adapter_for(model).layers
    if expected_layers is not None and len(layers) != expected_layers:
        raise PlanError(f"plan was made for a model with {expected_layers} blocks, this one has {len(layers)} (already pruned?)")
    for mg in merges:
        if not all(0 <= j < len(layers) for j in [mg["into"], *mg["from"]]):
            raise PlanError(f"merge {mg} names blocks outside [0, {len(layers)})")
        rdsc_merge(layers[mg["into"]], [layers[j] for j in mg["from"]])


def remove_blocks(model: nn.Module, removed: list[int], expected_layers: int | None = None) -> None:
    """Physically drop decoder blocks; renumber ``layer_idx`` so the KV cache indexes stay dense."""
    ad = adapter_for(model)
    layers = ad.layers
    n = len(layers)
    if expected_layers is not None and n != expected_layers:
        raise PlanError(f"plan was made for a model with {expected_layers} blocks, this one has {n} (already pruned?)")
    bad = [i for i in removed if not 0 <= i < n]
    if bad or len(set(removed)) != len(removed):
        raise PlanError(f"removed_blocks {removed} must be distinct indices in [0, {n})")
    if len(removed) >= n:
        raise PlanError(f"cannot remove all {n} blocks")
    keep = [i for i in range(n) if i not in set(removed)]
    ad.set_layers([layers[i] for i in keep])
    for new_idx, layer in enumerate(ad.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    ad.keep_blocks_config(keep)


# ----------------------------------------------------------------------------- width
def _slice_linear(lin: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None) -> nn.Linear:
    """A new Linear holding the kept output rows / input columns (bias follows the rows)."""
    w = lin.weight.data
    if rows is not None:
        w = w[torch.tensor(rows, dtype=torch.long, device=w.device)]
    if cols is not None:
        w = w[:, torch.tensor(cols, dtype=torch.long, device=w.device)]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        b = lin.bias.data if rows is None else lin.bias.data[torch.tensor(rows, dtype=torch.long, device=w.device)]
        new.bias.data.copy_(b)
    return new


def _slice_member(layer: nn.Module, path: str, axis: str, idx: list[int]) -> None:
    parent, name = path.rsplit(".", 1)
    owner = layer.get_submodule(parent)
    lin = getattr(owner, name)
    setattr(owner, name, _slice_linear(lin, rows=idx) if axis == "out" else _slice_linear(lin, cols=idx))


def _slice_projection_norm(layer: nn.Module, path: str, gone: set[int], arch: type[ArchAdapter]) -> None:
    """An RMSNorm over a whole projection (D entries, OLMo 2's q_norm / k_norm) loses ``gone``. Over the kept D'
    entries it must still divide by rsqrt(S/D + ε) (S = Σ x² over the kept entries, the removed ones being zero):
    its kept effective weights (offset + w) are scaled by sqrt(D/D'), and the projection feeding it by sqrt(D'/D),
    which turns the ε it adds into ε·D/D' (the norm is scale-invariant but for ε):
    w·sqrt(D/D')·αx·rsqrt(α²S/D' + ε) = w·x·rsqrt(S/D + ε) with α² = D'/D — exact, and ε itself (the config's one
    ``rms_norm_eps``, shared by every norm) stays as it is, so a vanilla reload gives the same model."""
    norm = layer.get_submodule(path)
    size = norm.weight.shape[0]
    keep = torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long, device=norm.weight.device)
    off = arch.NORM_OFFSET
    norm.weight = nn.Parameter((norm.weight.data[keep] + off) * (size / len(keep)) ** 0.5 - off)
    _scale_rows(arch.linear(layer, arch.NORM_INPUTS[path]), (len(keep) / size) ** 0.5)


def _scale_rows(lin: nn.Linear, factor: float) -> None:
    lin.weight.data.mul_(factor)
    if lin.bias is not None:
        lin.bias.data.mul_(factor)


def prune_layer_width(layer: nn.Module, removed: dict[str, list[int]], arch: type[ArchAdapter] | None = None) -> None:
    """Physically remove query heads, KV heads and MLP channels of one decoder layer (the members of each unit
    come from the family's adapter ``arch``; the default is the Llama layout)."""
    if arch is None:
        arch = layer_adapter(layer)
    geo = arch.geometry(layer)
    n_q, n_kv = geo.n_q, geo.n_kv
    keep_q = [h for h in range(n_q) if h not in set(removed.get("q_heads", []))]
    keep_kv = [h for h in range(n_kv) if h not in set(removed.get("kv_heads", []))]
    if not keep_q or not keep_kv:
        raise PlanError("a layer must keep at least one query head and one KV head")
    if len(keep_q) % len(keep_kv):
        raise PlanError(f"{len(keep_q)} query heads cannot share {len(keep_kv)} KV heads evenly (a KV group would split)")
    qpg_old = n_q // n_kv
    for g in range(n_kv):  # every kept query head must still map onto its own KV head after renumbering
        members = [h for h in keep_q if h // qpg_old == g]
        if (g in keep_kv) != bool(members) or (members and len(members) != len(keep_q) // len(keep_kv)):
            raise PlanError(f"KV group {g} would be split: query heads {members} kept, KV head kept={g in keep_kv}")
    keep_c = [c for c in range(geo.intermediate) if c not in set(removed.get("mlp", []))]
    if not keep_c and (geo.intermediate or removed.get("mlp")):  # MoE layers have no dense MLP channels
        raise PlanError("a layer must keep at least one MLP channel")
    # what every member loses: the union over unit kinds of its index map (a fused qkv_proj loses q, k and v rows)
    lost: dict[tuple[str, str], set[int]] = {}
    for kind, units in (("q_head", removed.get("q_heads", [])), ("kv_group", removed.get("kv_heads", [])),
                        ("mlp_channel", removed.get("mlp", []))):
        if not units:  # a kind this layer loses nothing of (MoE layers have no MLP channel members at all)
            continue
        for m in arch.members(kind):
            lost.setdefault((m.path, m.axis), set()).update(m.index(sorted(units), geo))
    for (path, axis), gone in lost.items():
        if gone and axis != "norm":
            lin = layer.get_submodule(path)
            size = lin.out_features if axis == "out" else lin.in_features
            _slice_member(layer, path, axis, [r for r in range(size) if r not in gone])
    for (path, axis), gone in lost.items():  # after the projections feeding them are sliced
        if gone and axis == "norm":
            _slice_projection_norm(layer, path, gone, arch)
    if len(keep_q) < n_q or len(keep_kv) < n_kv:
        arch.set_attention_groups(layer, len(keep_q), len(keep_kv))
    if len(keep_c) < geo.intermediate:
        arch.set_intermediate(layer, len(keep_c))


def prune_hidden(model: nn.Module, removed: list[int], norm_rescale: bool = True) -> None:
    """Remove hidden (residual-stream) channels everywhere: embedding and untied-head columns, every RMSNorm entry,
    q/k/v/gate/up input columns, o/down output rows (and bias entries). Tied embeddings stay tied.

    Zeroing channel c everywhere (masking) keeps it 0 in the residual stream, but RMSNorm still divides by d. With
    ``norm_rescale`` the kept norm weights are scaled by sqrt(d/d') and eps by d/d' (d' = d − k), which makes
    RMSNorm over d' channels equal to RMSNorm over d channels with k zeros — removal then equals masking exactly:
    x·w·rsqrt(S/d + ε) = x·w·sqrt(d/d')·rsqrt(S/d' + ε·d/d'),  S = Σ x².
    """
    ad = adapter_for(model)
    cfg = model.config
    d = cfg.hidden_size
    drop = set(removed)
    if not drop or any(not 0 <= c < d for c in drop) or len(drop) >= d:
        raise PlanError(f"hidden channels to remove must be distinct, in [0, {d}) and fewer than {d}")
    keep = [c for c in range(d) if c not in drop]
    if not vanilla_accepts(cfg.model_type, len(keep), cfg.num_attention_heads):
        raise PlanError(f"hidden_size {len(keep)} is not a multiple of num_attention_heads {cfg.num_attention_heads}, "
                        "which transformers' LlamaConfig refuses; remove a number of channels that keeps it a multiple")
    idx = torch.tensor(keep, dtype=torch.long)
    scale = (d / len(keep)) ** 0.5 if norm_rescale else 1.0
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is model.get_input_embeddings().weight

    emb = ad.embedding
    new_emb = ad.hidden_embedding(emb.weight.data[:, idx.to(emb.weight.device)], emb.padding_idx, d)
    ad.set_embedding(new_emb)
    # Gemma scales the embedding by sqrt(hidden): the adapter multiplied the kept weights by sqrt(d/d') so the embedded
    # state is unchanged; a tied head then reads those scaled weights, so the final norm takes the factor back out.
    emb_factor = ad.embedding_rescale(d, len(keep))
    if tied:
        ad.head.weight = new_emb.weight
    else:
        ad.set_head(_slice_linear(ad.head, cols=keep))
    off = ad.NORM_OFFSET  # Gemma's (1 + w): the effective weight (off + w) is what gets rescaled

    def norm(module: nn.Module, factor: float = 1.0) -> None:
        w = (module.weight.data[idx.to(module.weight.device)] + off) * (scale * factor) - off
        module.weight = nn.Parameter(w)
        for attr in ("variance_epsilon", "eps"):
            if norm_rescale and hasattr(module, attr):
                setattr(module, attr, getattr(module, attr) * d / len(keep))

    norm(ad.final_norm, 1.0 / emb_factor if tied else 1.0)
    for layer in ad.layers:
        for layer_norm in ad.layer_norms(layer):
            norm(layer_norm)
        for path in ad.linear_paths():
            lin = layer.get_submodule(path)
            ad.set_module(layer, path, _slice_linear(lin, rows=keep) if path in ad.output_paths() else _slice_linear(lin, cols=keep))
        ad.set_layer_hidden(layer, len(keep))
        for path, head_norm in zip(ad.HEAD_NORMS, ad.head_norms(layer), strict=True):
            if norm_rescale:  # Qwen3, OLMo 2: these norms read the config's eps too, so they follow it (reload = in
                attr = "variance_epsilon" if hasattr(head_norm, "variance_epsilon") else "eps"  # memory)
                setattr(head_norm, attr, getattr(head_norm, attr) * d / len(keep))
                if path in ad.NORM_INPUTS:  # ... and their input scales by sqrt(d/d'), which takes that back out
                    _scale_rows(ad.linear(layer, ad.NORM_INPUTS[path]), (d / len(keep)) ** 0.5)
    cfg.head_dim = ad.attention(ad.layers[0]).head_dim  # explicit before hidden_size changes: heads × head_dim ≠ hidden
    cfg.hidden_size = len(keep)
    if norm_rescale:
        cfg.rms_norm_eps = cfg.rms_norm_eps * d / len(keep)


def add_output_biases(model: nn.Module, side: dict[str, torch.Tensor]) -> None:
    """Fold compensation vectors into the attention-output / MLP-output biases, keeping a vanilla-loadable layout.

    Llama's ``attention_bias`` makes transformers build biases on q, k, v AND o; ``mlp_bias`` on gate, up
    AND down. So when a flag is switched on, every such projection of every layer gets a bias,
    zero except where compensation put a value. A family whose output projections cannot hold a bias
    (the adapter's ``bias_flags``) is refused: a vanilla reload would drop it.
    """
    ad = adapter_for(model)
    cfg = model.config
    flags = ad.bias_flags()
    groups = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
    wanted = {part: any(ad.param_name(i, r, "bias") in side for i in range(ad.num_blocks) for r in roles)
              for part, roles in groups.items()}
    for part, want in wanted.items():
        if want and part not in flags:
            raise PlanError(compensation_refusal(cfg.model_type) or f"{ad.family} cannot hold a {part} output bias")
    need = {part: wanted[part] or bool(getattr(cfg, flags[part], False)) for part in flags}
    for i, layer in enumerate(ad.layers):
        for part, roles in groups.items():
            if not need.get(part):
                continue
            for role in roles:
                lin = ad.linear(layer, role)
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
                key = ad.param_name(i, role, "bias")
                if key in side:
                    lin.bias.data += side[key].to(lin.bias.device, lin.bias.dtype)
    for part, flag in flags.items():
        setattr(cfg, flag, bool(need[part]))


def set_width_config(model: nn.Module, shapes: list[dict[str, int]]) -> None:
    """Uniform widths → a vanilla config; otherwise keep per-layer shapes for the prunelab loader."""
    ad = adapter_for(model)
    cfg = model.config
    cfg.head_dim = ad.attention(ad.layers[0]).head_dim  # explicit: heads × head_dim ≠ hidden now
    # plan shape key → config key (the MLP width lives where the adapter says: none on Mixtral, Qwen2-MoE's shared
    # expert width)
    keys = {"num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_key_value_heads"}
    if ad.MLP_CONFIG is not None:
        keys["intermediate_size"] = ad.MLP_CONFIG
    moe = [s for s in shapes if s.get("num_experts") is not None]
    if moe:  # one expert count and width for all MoE layers (the config holds one)
        if any((s["num_experts"], s["expert_intermediate_size"]) != (moe[0]["num_experts"], moe[0]["expert_intermediate_size"])
               for s in moe):
            raise PlanError("every MoE layer must keep the same number of experts and expert width (transformers reads "
                            "them from the shared config)")
        ad.set_expert_config(cfg, moe[0]["num_experts"], moe[0]["expert_intermediate_size"])
    if all(s == shapes[0] for s in shapes) and vanilla_accepts(cfg.model_type, cfg.hidden_size, shapes[0]["num_attention_heads"]):
        for k, attr in keys.items():
            setattr(cfg, attr, shapes[0][k])
        if hasattr(cfg, "prunelab_layer_shapes"):
            del cfg.prunelab_layer_shapes
    else:
        for k, attr in keys.items():  # the largest shape, so a config without the loader fails loudly on sizes
            setattr(cfg, attr, max(s[k] for s in shapes))
        if not vanilla_accepts(cfg.model_type, cfg.hidden_size, cfg.num_attention_heads):  # e.g. Llama-7B keeping 24 of 32 heads
            # a value LlamaConfig accepts; the loader builds every layer from prunelab_layer_shapes anyway
            cfg.num_attention_heads = max(h for h in range(1, cfg.num_attention_heads + 1) if cfg.hidden_size % h == 0)
        cfg.prunelab_layer_shapes = shapes


def vanilla_accepts(model_type: str, hidden_size: int, num_attention_heads: int) -> bool:
    """Whether transformers' config class accepts this head count: ``LlamaConfig`` (5.x) insists on
    ``hidden_size % num_attention_heads == 0`` even when ``head_dim`` is explicit; Mistral and Qwen do not.
    A uniform result it refuses is saved with per-layer shapes for the prunelab loader instead."""
    return model_type != "llama" or hidden_size % num_attention_heads == 0
