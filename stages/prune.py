"""Stage: select units from scores → ``plan.json`` → surgery. The plan is the contract between them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.registry import register_stage
from stages import criteria as _criteria  # noqa: F401
from stages.core.config import StrictModel
from stages.criteria.registry import criteria_for
from stages.selection.targets import blocks_for_ratio, hidden_channels_to_remove


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
                from stages.selection.width import WidthTargetError, uniform_layer

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
            k = blocks_for_ratio(self.ratio, total_params, block_params, self.rounding)
            if k >= num_layers:
                return [f"ratio={self.ratio} would remove {k} of {num_layers} blocks; choose a smaller ratio"]
            if k < 1:
                return [f"ratio={self.ratio} is less than one block ({block_params / total_params:.3f}); raise it or use num_blocks"]
        return []


def _apply(ctx: Any, plan: dict[str, Any], side: dict[str, Any] | None = None) -> dict[str, Any]:
    from stages.surgery.apply import apply_plan

    apply_plan(ctx.model, plan, side)
    ctx.plan, ctx.state = plan, "pruned"
    params_after = ctx.adapter.total_params()
    plan["params_after"] = params_after
    plan["achieved_ratio"] = round(1 - params_after / plan["params_before"], 6)
    ctx.model_info.update(params_after=params_after, layers_after=ctx.adapter.num_blocks)
    return {k: plan.get(k) for k in ("removed_blocks", "num_removed", "achieved_ratio", "layers_after", "params_after")}


def run(ctx: Any, cfg: PruneConfig) -> dict[str, Any]:
    from stages.core.files import atomic_write_json
    from stages.selection.blocks import make_plan
    from stages.selection.planning import make_width_plan

    if cfg.units == "width":
        plan, side = make_width_plan(ctx.scores[cfg.criterion], cfg, ctx.model, ctx.activation_stats)
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
