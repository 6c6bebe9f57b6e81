"""Stage: select units from scores → ``plan.json`` → surgery. The plan is the contract between them."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from prunelab.registry import register_stage
from prunelab.stages.core import migrate as legacy
from prunelab.stages.core.config import StrictModel
from prunelab.stages.selection.config import SELECTIONS, allowed_keys, validate_selection

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
    ``compensation: {type: optimal, damping, bias}`` (``prunelab.stages.core.migrate.migrate``); ``v1_settings()``
    gives the old flat dump, so run directories made before still ``--resume``.
    """

    type: Literal["prune"]
    units: str = Field("blocks", description="what to remove: a registered mode (stages.selection.config.SELECTIONS): "
                       "blocks | width | hidden | sublayers")
    criterion: str = Field(..., description="which computed criterion decides (see `score`)")

    def __init__(self, **data: Any) -> None:  # pydantic builds instances of the class called: the union has none
        if type(self) is PruneConfig:
            raise TypeError("PruneConfig is a union: use PruneConfig.model_validate({...}) or variant_class(units)(...)")
        super().__init__(**data)

    @model_validator(mode="wrap")
    @classmethod
    def _variant(cls, data: Any, handler: Any) -> Any:
        variants = {u: variant_class(u) for u in SELECTIONS}
        data = legacy.migrate(data, {u: set(allowed_keys(c)) for u, c in variants.items()})
        if cls is not PruneConfig or isinstance(data, PruneConfig):
            return handler(data)
        return validate_selection(data, variants, legacy.explain_old)

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


@functools.cache
def variant_class(units: str) -> type[PruneConfig]:
    """The prune stage's class for a registered mode: its settings (``SELECTIONS``) with the stage's fields, built
    once per mode, so a mode registered anywhere is a prune variant without an edit here (``BlocksPrune``, ...)."""
    settings = SELECTIONS.config(units)
    name = settings.__name__.removesuffix("Settings") + "Prune"
    return type(name, (settings, PruneConfig), {"__doc__": settings.__doc__, "__module__": __name__})


BlocksPrune, WidthPrune, HiddenPrune, SublayersPrune = map(variant_class, ("blocks", "width", "hidden", "sublayers"))


def _apply(ctx: RunContext, plan: Any, side: dict[str, Any] | None = None) -> dict[str, Any]:
    from prunelab.stages.surgery.apply import apply_plan

    apply_plan(ctx.model, plan, side)
    ctx.plan, ctx.state = plan, "pruned"
    plan.params_after = ctx.adapter.total_params()
    plan.achieved_ratio = round(1 - plan.params_after / plan.params_before, 6)
    ctx.model_info.update(params_after=plan.params_after, layers_after=ctx.adapter.num_blocks)
    return plan.outputs()


def run(ctx: RunContext, cfg: PruneConfig) -> dict[str, Any]:
    from prunelab.stages.core.files import atomic_write_json

    make_plan = SELECTIONS.impl(cfg.units)
    plan, side = make_plan(ctx.scores[cfg.criterion], cfg, ctx.model, ctx.activation_stats, ctx.scores, ctx.calibration)
    outputs = _apply(ctx, plan, side)
    if ctx.is_main:
        if side:
            from safetensors.torch import save_file

            tmp = ctx.stage_dir / f".{plan.side_file}.tmp"
            save_file({k: v.contiguous() for k, v in side.items()}, str(tmp))
            tmp.replace(ctx.stage_dir / plan.side_file)
        atomic_write_json(ctx.stage_dir / "plan.json", plan.to_json())
    return outputs


def restore(ctx: RunContext, cfg: PruneConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    from prunelab.stages.surgery.plan import load_plan

    plan = load_plan(json.loads((stage_dir / "plan.json").read_text()))
    side = None
    if plan.side_file:
        from safetensors.torch import load_file

        side = load_file(str(stage_dir / plan.side_file))
    _apply(ctx, plan, side)


register_stage("prune", PruneConfig, run, restore)
