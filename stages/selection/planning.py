"""Width and hidden-channel plans from a criterion's saved result, an allocation rule and compensation."""

from __future__ import annotations

import logging
from typing import Any

from prunelab.stages.arch import adapter_for
from prunelab.stages.selection import engines  # module-qualified: tests stand in for uniform_counts
from prunelab.stages.selection.config import HiddenSettings, WidthSettings
from prunelab.stages.selection.engines import (
    best_uniform,
    engine_refusals,
    needs_uniform_attention,
    query_heads_uniform,
    uniform_attention,
)
from prunelab.stages.selection.targets import hidden_channels_to_remove, ratio_to_params
from prunelab.stages.surgery.plan import HiddenPlan, HiddenRemoval, HiddenTarget, WidthPlan, WidthTarget
from prunelab.stages.surgery.targets import ALLOCATIONS, COMPENSATIONS


def make_width_plan(result: dict[str, Any], cfg: WidthSettings, model: Any, means: dict[str, Any] | None,
                    results: dict[str, Any] | None = None, calibration: Any = None) -> tuple[WidthPlan, dict[str, Any]]:
    """Width plan (removed units per layer, shapes before/after) and its side tensors (compensation). ``results``: every
    criterion's result by name (the expert units' criteria; default: ``result`` for all). ``calibration``: the
    signature every plan maker shares; width selection needs only the scores (vLLM's uniform attention count included:
    ``engines.best_uniform``)."""
    # lazy: torch-free
    from prunelab.stages.selection.width import WidthTargetError, removed_params, select_global, select_uniform, summarize

    adapter = adapter_for(model)
    geos = adapter.geometries()
    start, end = cfg.layers if cfg.layers is not None else (0, len(geos))
    layers = list(range(start, end))
    before = adapter.total_params()
    target = ratio_to_params(cfg.ratio, before) if cfg.ratio is not None else None
    scores = result["layers"]
    alloc, comp = cfg.allocation, cfg.compensation
    offsets, record = None, {}
    if cfg.mlp and geos and any(g.experts and not g.intermediate for g in geos):  # Qwen2-MoE: its shared expert
        raise WidthTargetError(f"mlp: true — {adapter.family} MLPs are mixtures of experts with no dense MLP channels; set "
                               "mlp: false and prune `experts` and/or `expert_channels`")
    refusals = engine_refusals(model.config.model_type, cfg)
    if refusals:
        raise WidthTargetError("; ".join(refusals))
    if not cfg.dense_units():
        chosen = {i: {"q_heads": [], "kv_heads": [], "mlp": []} for i in layers}
    elif alloc.ranks_globally:
        chosen = select_global(scores, geos, layers, cfg.mlp, cfg.attention, target, cfg.round_to)
    else:
        allocate = ALLOCATIONS.impl(alloc.type)  # per-layer ratio offsets (stages.surgery.targets); None: uniform
        if allocate is not None:
            offsets, record = allocate(model, means, layers, alloc)
        chosen = select_uniform(scores, geos, layers, cfg.attention, cfg.mlp, cfg.layer_ratio, target, offsets,
                                getattr(alloc, "counts", "nearest"), cfg.round_to)
    compensation = COMPENSATIONS.impl(comp.type)  # side tensors by parameter (stages.surgery.targets); None: none

    def compensate(chosen: dict[int, dict[str, list[int]]]) -> dict[str, Any]:
        if getattr(model, "prunelab_weights", None) is not None:  # streamed skeleton: the export compensates per block
            return {}
        return compensation(model, chosen, means, comp) if compensation is not None else {}

    if cfg.dense_units() and needs_uniform_attention(cfg, alloc.ranks_globally or offsets is not None):
        # vLLM: one global query-head count — attention made uniform, MLP re-selected for the rest of the target
        def constrained(count: int | None) -> dict[int, dict[str, list[int]]]:
            out = uniform_attention(chosen, scores, geos, layers, cfg.attention, count)
            rest = None if target is None else target - removed_params(out, geos)
            if cfg.mlp and (rest is None or rest > 0):
                if alloc.ranks_globally:
                    mlp_only = select_global(scores, geos, layers, True, "none", rest, cfg.round_to)
                else:
                    mlp_only = select_uniform(scores, geos, layers, "none", True, cfg.layer_ratio, rest, offsets,
                                              getattr(alloc, "counts", "nearest"), cfg.round_to)
                for i in layers:
                    out[i]["mlp"] = mlp_only[i]["mlp"]
            return out

        candidates = {k: constrained(k) for k in engines.uniform_counts(chosen, geos, layers, cfg.attention)}
        count, estimates = best_uniform(candidates, scores, geos, cfg.attention)
        chosen = candidates[count]
        logging.getLogger(__name__).info(
            "engines: vllm — uniform %s removed per layer: score × params per removed param %s; kept %d",
            "KV groups" if cfg.attention == "kv_group" else "query heads per group",
            ", ".join(f"{k}: {v:.4g}" for k, v in estimates.items()), count)
    side = compensate(chosen)
    if cfg.moe_units():
        from prunelab.stages.selection.experts import select_experts  # lazy: torch-free

        by_key = {k: (results or {}).get(u.criterion, result)["layers"] for k, u in cfg.moe_units().items()}
        for i, rem in select_experts(by_key, geos, cfg.experts, cfg.expert_channels).items():
            chosen.setdefault(i, {"q_heads": [], "kv_heads": [], "mlp": []}).update(rem)
    shapes_after = summarize(chosen, geos)
    if "vllm" in cfg.engines and not query_heads_uniform(shapes_after):  # layers of different geometries to begin with
        raise WidthTargetError("engines: vllm — the plan's layers keep different query-head counts "
                               f"({sorted({s['num_attention_heads'] for s in shapes_after})}), which vLLM's DeciLM cannot "
                               "hold (one global num_attention_heads); set attention: none or leave vllm out")
    plan = WidthPlan(
        criterion=cfg.criterion,
        target=WidthTarget(ratio=cfg.ratio, layer_ratio=cfg.layer_ratio, allocation=alloc, layers=(start, end),
                           attention=cfg.attention, mlp=cfg.mlp, compensation=comp, experts=cfg.experts,
                           expert_channels=cfg.expert_channels),
        layers={str(i): rem for i, rem in chosen.items() if any(rem.values())},
        shapes_before=summarize({}, geos),
        shapes_after=shapes_after,
        uniform=all(s == shapes_after[0] for s in shapes_after),
        layer_ratio_offsets=offsets,
        num_removed=sum(len(r["q_heads"]) + len(r["kv_heads"]) + len(r["mlp"]) + len(r.get("experts", []))
                        + sum(map(len, r.get("expert_channels", []))) for r in chosen.values()),
        layers_before=len(geos),
        layers_after=len(geos),
        params_before=before,
        side_file="compensation.safetensors" if side else None,
        **record,
    )
    return plan, side


def make_hidden_plan(result: dict[str, Any], cfg: HiddenSettings, model: Any) -> HiddenPlan:
    """LLM-Pruner channel mode: the k lowest-scoring hidden channels, k from ``layer_ratio`` × d or from the parameter
    target (each channel owns the same parameters, so k = round(target / params per channel))."""
    from prunelab.stages.criteria.hidden import params_per_hidden_channel  # lazy: torch-free
    from prunelab.stages.selection.width import WidthTargetError, lowest, summarize  # lazy: torch-free

    if "hidden" not in result:
        raise ValueError(f"criterion {cfg.criterion} has no hidden-channel scores; re-run the width score stage "
                         "(it scores hidden channels when a later prune stage sets units: hidden)")
    d = model.config.hidden_size
    before = adapter_for(model).total_params()
    per = params_per_hidden_channel(model)
    want = cfg.layer_ratio * d if cfg.layer_ratio is not None else ratio_to_params(cfg.ratio, before) / per
    k = hidden_channels_to_remove(d, model.config.num_attention_heads, want)
    if k >= d:
        raise WidthTargetError(f"the target would remove all {d} hidden channels; lower it")
    if k < 1:
        raise WidthTargetError(f"the target removes less than one hidden channel ({per} parameters each); raise it")
    geos = adapter_for(model).geometries()
    shapes = summarize({}, geos)
    return HiddenPlan(
        criterion=cfg.criterion,
        target=HiddenTarget(ratio=cfg.ratio, layer_ratio=cfg.layer_ratio, norm_rescale=cfg.norm_rescale),
        hidden=HiddenRemoval(removed=lowest(result["hidden"], k), hidden_before=d, hidden_after=d - k,
                             norm_rescale=cfg.norm_rescale),
        shapes_before=shapes,
        shapes_after=shapes,
        uniform=True,
        num_removed=k,
        layers_before=len(geos),
        layers_after=len(geos),
        params_before=before,
    )


def hidden_plan(result: dict[str, Any], cfg: HiddenSettings, model: Any, stats: Any = None, results: Any = None,
                calibration: Any = None) -> tuple[HiddenPlan, dict[str, Any]]:
    """The plan maker registered for ``units: hidden`` (``selection.config.SELECTIONS``): no side tensors."""
    return make_hidden_plan(result, cfg, model), {}
