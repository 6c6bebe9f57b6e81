"""Stage: select units from scores → ``plan.json`` → surgery. The plan is the contract between them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.recipe import StrictModel
from pipeline.registry import criteria_for, register_stage
from stages import criteria as _criteria  # noqa: F401


class PruneConfig(StrictModel):
    type: Literal["prune"]
    units: Literal["blocks", "width"] = Field("blocks", description="remove decoder blocks, or heads / KV groups / MLP channels")
    criterion: str = Field(..., description="which computed criterion decides (see `score`)")
    num_blocks: int | None = Field(None, ge=1, description="blocks: remove exactly this many blocks")
    ratio: float | None = Field(
        None, gt=0, lt=1, description="remove this fraction of ALL parameters (embeddings included, as Shortened LLaMA counts)"
    )
    rounding: Literal["nearest", "floor", "ceil"] = Field(
        "nearest", description="blocks: how a ratio becomes a whole number of blocks"
    )
    # ---- width only
    layer_ratio: float | None = Field(
        None, gt=0, lt=1, description="width: fraction of each layer's units to remove (LLM-Pruner's per-layer ratio)"
    )
    allocation: Literal["uniform", "global", "owl", "alpha"] = Field(
        "uniform",
        description="width: same fraction per layer (vanilla config), one global ranking (FLAP AL-AM), OWL's "
        "outlier-weighted layer ratios, or AlphaPruning's heavy-tail (α) ratios — the last two combine with any criterion",
    )
    alpha_epsilon: float = Field(0.08, ge=0, lt=0.5, description="AlphaPruning: layer ratios span r ± epsilon")
    owl_m: float = Field(5.0, gt=0, description="OWL: a score is an outlier above M × the layer mean")
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="OWL: layer ratios span r ± lambda")
    layers: tuple[int, int] | None = Field(
        None, description="width: [start, end) layer range to prune; LLM-Pruner keeps the first and last layers"
    )
    attention: str = Field("kv_group", description="width: kv_group | q_head | none — head_dim never changes")
    mlp: bool = Field(True, description="width: prune MLP channels")
    hidden: bool = Field(
        False, description="width: prune hidden (residual-stream) channels instead — LLM-Pruner's channel mode; every "
        "embedding, norm, projection and the head shrink together (set attention: none, mlp: false)"
    )
    hidden_norm_rescale: bool = Field(
        True, description="hidden: scale kept RMSNorm weights by sqrt(d/d') and eps by d/d' so the pruned model equals the "
        "masked one (zeroed channels) exactly; false slices only, as LLM-Pruner does (every norm's scale then shifts)"
    )
    compensation: Literal["none", "bias", "optimal"] = Field(
        "none", description="width: FLAP's bias (removed channels' mean output), or optimal: the APT/OBS closed-form "
        "update of the kept o_proj/down_proj columns (plus bias) on calibration inputs"
    )
    damping: float = Field(0.01, gt=0, description="optimal compensation: λ = damping × mean(diag XᵀX) added to XᵀX")
    optimal_bias: bool = Field(True, description="optimal compensation: also solve for the output bias (then it is "
                               "never worse than FLAP's bias on calibration data); false: weights only, as in APT")

    @field_validator("attention")
    @classmethod
    def _attention(cls, v: str) -> str:
        if v == "head_dim" or "dim" in v:
            raise ValueError("head_dim never changes: prune whole heads with attention: kv_group or q_head")
        if v not in ("kv_group", "q_head", "none"):
            raise ValueError(f"attention {v!r}: choose kv_group (whole GQA groups), q_head (query heads inside groups) or none")
        return v

    @model_validator(mode="after")
    def _targets(self) -> PruneConfig:
        registry = criteria_for(self.units)
        if self.criterion not in registry:
            raise ValueError(f"unknown {self.units} criterion {self.criterion!r}; choose from {', '.join(registry.names())}")
        if self.units == "blocks":
            if (self.num_blocks is None) == (self.ratio is None):
                raise ValueError("give exactly one target: `num_blocks` (a count) or `ratio` (a fraction of parameters in (0, 1))")
            if self.layer_ratio is not None or self.allocation != "uniform" or self.compensation != "none":
                raise ValueError("layer_ratio, allocation and compensation are width settings; set units: width")
            return self
        if self.num_blocks is not None:
            raise ValueError("num_blocks is a depth target; for width give `ratio` or `layer_ratio`")
        if (self.ratio is None) == (self.layer_ratio is None):
            raise ValueError("give exactly one width target: `ratio` (of all parameters) or `layer_ratio` (of each layer's units)")
        if self.hidden:
            from stages.criteria import HIDDEN_CRITERIA

            if self.attention != "none" or self.mlp:
                raise ValueError("hidden channels are pruned on their own (LLM-Pruner's channel mode): set attention: none and mlp: false")
            if self.allocation != "uniform" or self.layers is not None or self.compensation != "none":
                raise ValueError("hidden channels span every layer: allocation, layers and compensation do not apply; remove them")
            if self.criterion not in HIDDEN_CRITERIA:
                raise ValueError(f"criterion {self.criterion!r} has no hidden-channel score; choose from {', '.join(HIDDEN_CRITERIA)}")
            return self
        if self.allocation == "global" and self.layer_ratio is not None:
            raise ValueError("allocation: global needs `ratio` (a parameter budget), not layer_ratio")
        if self.allocation == "global" and self.attention == "q_head":
            raise ValueError("allocation: global ranks whole KV groups; use attention: kv_group or allocation: uniform")
        if self.attention == "none" and not self.mlp:
            raise ValueError("nothing to prune: enable mlp or choose an attention unit")
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1]:
            raise ValueError(f"layers {list(self.layers)} must be [start, end) with 0 <= start < end")
        return self

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        if any(stages[k].type == "prune" for k in seen):
            return ["only one prune stage per recipe; combine targets into one"]
        scorers = [stages[k] for k in seen if stages[k].type == "score" and stages[k].units == self.units]
        if not scorers:
            return [f"needs a `score` stage with units: {self.units} before it"]
        if not any(not s.criteria or self.criterion in s.criteria for s in scorers):
            return [f"criterion {self.criterion!r} is not computed by an earlier score stage; add it to its `criteria`"]
        return []

    def check_model(self, num_layers: int, total_params: int | None = None, block_params: float | None = None,
                    geometries: list[Any] | None = None) -> list[str]:
        """Problems only visible once the model's size is known (checked before any heavy work)."""
        if self.units == "width":
            if self.hidden and geometries and self.layer_ratio is not None:
                d = geometries[0].hidden
                if hidden_channels_to_remove(d, geometries[0].n_q, self.layer_ratio * d) >= d:
                    return [f"layer_ratio={self.layer_ratio} would remove all {d} hidden channels; lower it"]
            if self.layers is not None and self.layers[1] > num_layers:
                return [f"layers {list(self.layers)} reach past the model's {num_layers} layers; end at most {num_layers}"]
            if geometries and self.layer_ratio is not None:
                from stages.width_select import WidthTargetError, uniform_layer

                start, end = self.layers or (0, num_layers)
                for i in range(start, end):
                    g = geometries[i]
                    dummy = {"q_heads": [0.0] * g.n_q, "kv_groups": [0.0] * g.n_kv, "mlp": [0.0] * g.intermediate}
                    try:
                        uniform_layer(dummy, g, self.layer_ratio, self.attention, self.mlp, i)
                    except WidthTargetError as exc:
                        return [f"layer_ratio={self.layer_ratio}: {exc}"]
            return []
        if self.num_blocks is not None and self.num_blocks >= num_layers:
            return [f"num_blocks={self.num_blocks} but the model has {num_layers} blocks; choose at most {num_layers - 1}"]
        if self.ratio is not None and total_params and block_params:
            k = _round(self.ratio * total_params / block_params, self.rounding)
            if k >= num_layers:
                return [f"ratio={self.ratio} would remove {k} of {num_layers} blocks; choose a smaller ratio"]
            if k < 1:
                return [f"ratio={self.ratio} is less than one block ({block_params / total_params:.3f}); raise it or use num_blocks"]
        return []


def _round(x: float, rule: str) -> int:
    if rule == "floor":
        return math.floor(x + 1e-9)
    if rule == "ceil":
        return math.ceil(x - 1e-9)
    return math.floor(x + 0.5)


def num_blocks_for(cfg: PruneConfig, adapter: Any) -> int:
    """Resolve the target to a block count (blocks of one decoder are equal in size)."""
    sizes = adapter.block_param_counts()
    problems = cfg.check_model(len(sizes), adapter.total_params(), sum(sizes) / len(sizes))
    if problems:
        raise ValueError("; ".join(problems))
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    return _round(cfg.ratio * adapter.total_params() / (sum(sizes) / len(sizes)), cfg.rounding)


def select_blocks(result: dict[str, Any], k: int) -> list[int]:
    """Blocks to remove: the best window (angular), the first k of an order (SLEB), else the k lowest scores."""
    if "windows" in result:
        dist = result["windows"][str(k)]
        start = min(range(len(dist)), key=lambda s: (dist[s], s))
        return list(range(start, start + k))
    if "order" in result:
        if len(result["order"]) < k:
            raise ValueError(f"criterion ordered only {len(result['order'])} blocks, {k} requested; re-run score")
        return sorted(result["order"][:k])
    candidates = [(s, i) for i, s in enumerate(result["scores"]) if s is not None and i not in set(result.get("protected", []))]
    if len(candidates) < k:
        raise ValueError(f"only {len(candidates)} blocks may be removed under this criterion's protections, {k} requested")
    return sorted(i for _, i in sorted(candidates)[:k])


def make_plan(result: dict[str, Any], cfg: PruneConfig, adapter: Any) -> dict[str, Any]:
    """The depth plan for ``cfg``'s target from one criterion's saved result (plain data in, plain data out)."""
    k = num_blocks_for(cfg, adapter)
    removed = select_blocks(result, k)
    sizes = adapter.block_param_counts()
    before = adapter.total_params()
    after = before - sum(sizes[i] for i in removed)
    merges = result.get("merges") or []
    if merges and sorted(j for mg in merges for j in mg["from"]) != removed:
        raise ValueError(f"criterion {cfg.criterion} merged {[mg['from'] for mg in merges]} but {k} blocks are to be removed; re-run score")
    return {
        "kind": "depth",
        "criterion": cfg.criterion,
        "target": {"num_blocks": cfg.num_blocks, "ratio": cfg.ratio, "rounding": cfg.rounding},
        **({"merges": [{"into": mg["into"], "from": mg["from"]} for mg in merges]} if merges else {}),
        "removed_blocks": removed,
        "num_removed": len(removed),
        "layers_before": len(sizes),
        "layers_after": len(sizes) - len(removed),
        "params_before": before,
        "params_after": after,
        "achieved_ratio": round(1 - after / before, 6),
    }


def make_width_plan(result: dict[str, Any], cfg: PruneConfig, model: Any, means: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Width plan (removed units per layer, shapes before/after) and its side tensors (compensation)."""
    from stages.arch.llama import adapter_for
    from stages.width_select import (
        bias_compensation,
        optimal_compensation,
        owl_offsets,
        ratio_to_params,
        select_global,
        select_uniform,
        summarize,
    )
    from stages.width_stats import geometry

    if cfg.hidden:
        return make_hidden_plan(result, cfg, model), {}
    adapter = adapter_for(model)
    geos = [geometry(layer) for layer in model.model.layers]
    start, end = cfg.layers if cfg.layers is not None else (0, len(geos))
    layers = list(range(start, end))
    attention = cfg.attention
    before = adapter.total_params()
    target = ratio_to_params(cfg.ratio, before) if cfg.ratio is not None else None
    scores = result["layers"]
    offsets = None
    alphas = None
    if cfg.allocation == "global":
        chosen = select_global(scores, geos, layers, cfg.mlp, attention, target)
    else:
        if cfg.allocation == "owl":
            if means is None:
                raise ValueError("allocation: owl needs activation statistics from a width `score` stage")
            offsets = owl_offsets(model, means["sq_norm"], layers, cfg.owl_m, cfg.owl_lambda)
        elif cfg.allocation == "alpha":
            from stages.criteria.alpha import alpha_offsets, layer_alphas

            alphas = layer_alphas(model)
            offsets = alpha_offsets(alphas, layers, cfg.alpha_epsilon)
        chosen = select_uniform(scores, geos, layers, attention, cfg.mlp, cfg.layer_ratio, target, offsets)
    side: dict[str, Any] = {}
    if cfg.compensation == "bias":
        if means is None:
            raise ValueError("compensation: bias needs activation means from a width `score` stage")
        side = bias_compensation(model, chosen, means)
    elif cfg.compensation == "optimal":
        if means is None or "gram" not in means:
            raise ValueError("compensation: optimal needs XᵀX of o_proj/down_proj inputs from the width `score` stage "
                             "(it collects them when a later prune stage asks for optimal compensation)")
        side = optimal_compensation(model, chosen, means["gram"], cfg.damping, cfg.optimal_bias)
    shapes_after = summarize(chosen, geos)
    plan = {
        "kind": "width",
        "criterion": cfg.criterion,
        "target": {"ratio": cfg.ratio, "layer_ratio": cfg.layer_ratio, "allocation": cfg.allocation,
                   "layers": [start, end], "attention": attention, "mlp": cfg.mlp, "compensation": cfg.compensation,
                   **({"damping": cfg.damping, "optimal_bias": cfg.optimal_bias} if cfg.compensation == "optimal" else {})},
        "layers": {str(i): rem for i, rem in chosen.items() if any(rem.values())},
        "shapes_before": summarize({}, geos),
        "shapes_after": shapes_after,
        "uniform": all(s == shapes_after[0] for s in shapes_after),
        "layer_ratio_offsets": offsets,
        "layer_alpha": alphas,
        "num_removed": sum(len(r["q_heads"]) + len(r["kv_heads"]) + len(r["mlp"]) for r in chosen.values()),
        "layers_before": len(geos),
        "layers_after": len(geos),
        "params_before": before,
        "side_file": "compensation.safetensors" if side else None,
    }
    return plan, side


def hidden_channels_to_remove(d: int, heads: int, want: float) -> int:
    """The channel count nearest ``want`` that keeps the width a multiple of ``heads`` (LlamaConfig refuses others)."""
    return min((c for c in range(d + 1) if (d - c) % heads == 0), key=lambda c: (abs(c - want), c))


def make_hidden_plan(result: dict[str, Any], cfg: PruneConfig, model: Any) -> dict[str, Any]:
    """LLM-Pruner channel mode: the k lowest-scoring hidden channels, k from ``layer_ratio`` × d or from the parameter
    target (each channel owns the same parameters, so k = round(target / params per channel))."""
    from stages.arch.llama import adapter_for
    from stages.criteria.hidden import params_per_hidden_channel
    from stages.width_select import WidthTargetError, _lowest, ratio_to_params, summarize
    from stages.width_stats import geometry

    if "hidden" not in result:
        raise ValueError(f"criterion {cfg.criterion} has no hidden-channel scores; re-run the width score stage "
                         "(it scores hidden channels when a later prune stage sets hidden: true)")
    d = model.config.hidden_size
    before = adapter_for(model).total_params()
    per = params_per_hidden_channel(model)
    want = cfg.layer_ratio * d if cfg.layer_ratio is not None else ratio_to_params(cfg.ratio, before) / per
    k = hidden_channels_to_remove(d, model.config.num_attention_heads, want)
    if k >= d:
        raise WidthTargetError(f"the target would remove all {d} hidden channels; lower it")
    if k < 1:
        raise WidthTargetError(f"the target removes less than one hidden channel ({per} parameters each); raise it")
    removed = _lowest(result["hidden"], k)
    geos = [geometry(layer) for layer in model.model.layers]
    shapes = summarize({}, geos)
    return {
        "kind": "width",
        "criterion": cfg.criterion,
        "target": {"ratio": cfg.ratio, "layer_ratio": cfg.layer_ratio, "hidden": True, "norm_rescale": cfg.hidden_norm_rescale},
        "layers": {},
        "hidden": {"removed": removed, "hidden_before": d, "hidden_after": d - k, "norm_rescale": cfg.hidden_norm_rescale},
        "shapes_before": shapes,
        "shapes_after": shapes,
        "uniform": True,
        "num_removed": k,
        "layers_before": len(geos),
        "layers_after": len(geos),
        "params_before": before,
        "side_file": None,
    }


def _apply(ctx: Any, plan: dict[str, Any], side: dict[str, Any] | None = None) -> dict[str, Any]:
    from stages.surgery import apply_plan

    apply_plan(ctx.model, plan, side)
    ctx.plan, ctx.state = plan, "pruned"
    params_after = ctx.adapter.total_params()
    plan["params_after"] = params_after
    plan["achieved_ratio"] = round(1 - params_after / plan["params_before"], 6)
    ctx.model_info.update(params_after=params_after, layers_after=ctx.adapter.num_blocks)
    return {k: plan.get(k) for k in ("removed_blocks", "num_removed", "achieved_ratio", "layers_after", "params_after")}


def run(ctx: Any, cfg: PruneConfig) -> dict[str, Any]:
    from pipeline.rundir import atomic_write_json

    if cfg.units == "width":
        plan, side = make_width_plan(ctx.scores[cfg.criterion], cfg, ctx.model, ctx.width_means)
    else:
        plan, side = make_plan(ctx.scores[cfg.criterion], cfg, ctx.adapter), {}
    outputs = _apply(ctx, plan, side)
    if ctx.is_main:
        if side:
            from safetensors.torch import save_file

            tmp = ctx.stage_dir / f".{plan['side_file']}.tmp"
            save_file({k: v.contiguous() for k, v in side.items()}, str(tmp))
            tmp.replace(ctx.stage_dir / plan["side_file"])
        atomic_write_json(ctx.stage_dir / "plan.json", plan)
    return outputs


def restore(ctx: Any, cfg: PruneConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    plan = json.loads((stage_dir / "plan.json").read_text())
    side = None
    if plan.get("side_file"):
        from safetensors.torch import load_file

        side = load_file(str(stage_dir / plan["side_file"]))
    _apply(ctx, plan, side)


register_stage("prune", PruneConfig, run, restore)
