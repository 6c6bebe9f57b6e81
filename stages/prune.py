"""Stage: select units from scores → ``plan.json`` → surgery. The plan is the contract between them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from prunelab.registry import register_stage
from prunelab.stages.core.config import StrictModel
from prunelab.stages.selection import legacy
from prunelab.stages.selection.config import (
    BlocksSettings,
    HiddenSettings,
    SublayersSettings,
    WidthSettings,
    allowed_keys,
    validate_selection,
)

if TYPE_CHECKING:
    from prunelab.context import RunContext


class PruneConfig(StrictModel):
    """The prune stage's settings: a union tagged by ``units`` (blocks by default).

    - ``units: blocks`` (:class:`BlocksPrune`): ``num_blocks`` or ``ratio``, ``rounding``;
    - ``units: width`` (:class:`WidthPrune`): ``ratio`` or ``layer_ratio``, ``allocation`` (uniform | global |
      {type: owl, m, lambda} | {type: alpha, epsilon}), ``layers``, ``attention``, ``mlp``, ``compensation``
      (none | bias | {type: optimal, damping, bias}), ``engines`` (transformers | llama.cpp | vllm: what the plan must
      run in, ``prunelab.stages.selection.engines``), ``round_to`` (kept MLP widths in multiples of N);
    - ``units: hidden`` (:class:`HiddenPrune`): ``ratio`` or ``layer_ratio``, ``norm_rescale``;
    - ``units: sublayers`` (:class:`SublayersPrune`): ``num_sublayers`` or ``ratio``, ``sublayers`` (attention | mlp | both).

    A setting of another mode is an error naming it. Validate with ``PruneConfig.model_validate(mapping)`` (it
    returns the variant) or build a variant directly.

    Migration: the flat spelling of version 1 still validates — ``hidden: true`` → ``units: hidden``,
    ``hidden_norm_rescale`` → ``norm_rescale``, ``owl_m``/``owl_lambda`` → ``allocation: {type: owl, m, lambda}``,
    ``alpha_epsilon`` → ``allocation: {type: alpha, epsilon}``, ``damping``/``optimal_bias`` →
    ``compensation: {type: optimal, damping, bias}`` (``prunelab.stages.selection.legacy.migrate``); ``v1_settings()``
    gives the old flat dump, so run directories made before still ``--resume``.
    """

    type: Literal["prune"]
    units: Literal["blocks", "width", "hidden", "sublayers"] = Field("blocks", description="blocks | width | hidden | sublayers")
    criterion: str = Field(..., description="which computed criterion decides (see `score`)")

    def __init__(self, **data: Any) -> None:
        if type(self) is PruneConfig:
            raise TypeError("PruneConfig is a union: use PruneConfig.model_validate({...}) or BlocksPrune / WidthPrune / HiddenPrune")
        super().__init__(**data)

    @model_validator(mode="wrap")
    @classmethod
    def _variant(cls, data: Any, handler: Any) -> Any:
        data = legacy.migrate(data, {u: set(allowed_keys(c)) for u, c in VARIANTS.items()})
        if cls is not PruneConfig or isinstance(data, PruneConfig):
            return handler(data)
        return validate_selection(data, VARIANTS, legacy.explain_old)

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        if any(stages[k].type == "prune" for k in seen):
            return ["only one prune stage per recipe; combine targets into one"]
        units = self.scored_units  # type: ignore[attr-defined]  (every variant has it)
        scorers = [stages[k] for k in seen if stages[k].type == "score" and stages[k].units == units]
        if not scorers:
            return [f"needs a `score` stage with units: {units} before it"]
        for name in getattr(self, "criteria", lambda: [self.criterion])():  # width: experts' criteria too
            if not any(not s.criteria or name in s.criteria for s in scorers):
                return [f"criterion {name!r} is not computed by an earlier score stage; add it to its `criteria`"]
        return []

    def v1_settings(self) -> dict[str, Any]:
        """These settings as the flat version-1 class dumped them (the runner's legacy settings hash)."""
        return legacy.v1_settings(self)


class BlocksPrune(BlocksSettings, PruneConfig):
    """Remove whole decoder blocks (depth pruning)."""


class WidthPrune(WidthSettings, PruneConfig):
    """Remove heads / KV groups / MLP channels (width pruning)."""


class HiddenPrune(HiddenSettings, PruneConfig):
    """Remove hidden channels everywhere (LLM-Pruner's channel mode)."""


class SublayersPrune(SublayersSettings, PruneConfig):
    """Remove whole attention / MLP sublayers (He et al., arXiv 2406.15786)."""

    def v1_settings(self) -> dict[str, Any]:
        return self.model_dump(mode="json")  # version 1 had no sublayer mode: its own settings are its hash


# longer than 150 lines because it holds the four variants of the one prune stage (blocks, width, hidden, sublayers)
VARIANTS: dict[str, type[PruneConfig]] = {"blocks": BlocksPrune, "width": WidthPrune, "hidden": HiddenPrune,
                                           "sublayers": SublayersPrune}
Prune = BlocksPrune | WidthPrune | HiddenPrune | SublayersPrune


def _apply(ctx: RunContext, plan: Any, side: dict[str, Any] | None = None) -> dict[str, Any]:
    from prunelab.stages.surgery.apply import apply_plan

    apply_plan(ctx.model, plan, side)
    ctx.plan, ctx.state = plan, "pruned"
    plan.params_after = ctx.adapter.total_params()
    plan.achieved_ratio = round(1 - plan.params_after / plan.params_before, 6)
    ctx.model_info.update(params_after=plan.params_after, layers_after=ctx.adapter.num_blocks)
    return plan.outputs()


def run(ctx: RunContext, cfg: Prune) -> dict[str, Any]:
    from prunelab.stages.core.files import atomic_write_json
    from prunelab.stages.selection.blocks import make_plan
    from prunelab.stages.selection.planning import make_hidden_plan, make_width_plan

    result = ctx.scores[cfg.criterion]
    side: dict[str, Any] = {}
    if isinstance(cfg, WidthPrune):
        plan, side = make_width_plan(result, cfg, ctx.model, ctx.activation_stats, ctx.scores, ctx.calibration)
    elif isinstance(cfg, HiddenPrune):
        plan = make_hidden_plan(result, cfg, ctx.model)
    elif isinstance(cfg, SublayersPrune):
        from prunelab.stages.selection.sublayers import make_sublayer_plan

        plan = make_sublayer_plan(result, cfg, ctx.adapter)
    else:
        plan = make_plan(result, cfg, ctx.adapter)
    outputs = _apply(ctx, plan, side)
    if ctx.is_main:
        if side:
            from safetensors.torch import save_file

            tmp = ctx.stage_dir / f".{plan.side_file}.tmp"
            save_file({k: v.contiguous() for k, v in side.items()}, str(tmp))
            tmp.replace(ctx.stage_dir / plan.side_file)
        atomic_write_json(ctx.stage_dir / "plan.json", plan.to_json())
    return outputs


def restore(ctx: RunContext, cfg: Prune, outputs: dict[str, Any], stage_dir: Path) -> None:
    from prunelab.stages.surgery.plan import load_plan

    plan = load_plan(json.loads((stage_dir / "plan.json").read_text()))
    side = None
    if plan.side_file:
        from safetensors.torch import load_file

        side = load_file(str(stage_dir / plan.side_file))
    _apply(ctx, plan, side)


register_stage("prune", PruneConfig, run, restore)
