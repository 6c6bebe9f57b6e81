"""Stage: select units from scores → ``plan.json`` → surgery. The plan is the contract between them."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SerializeAsAny, TypeAdapter, model_validator

from prunelab.registry import register_stage
from prunelab.stages.calibration.pipelines import pipeline_for, propagation_refusal
from prunelab.stages.core import migrate as legacy
from prunelab.stages.core.config import StrictModel
from prunelab.stages.core.files import atomic_write_json
from prunelab.stages.surgery.streamed import after_plan
from prunelab.stages.selection.config import SELECTIONS, allowed_keys, validate_selection
from prunelab.stages.selection.propagated import propagated_width_plan, score_batch_size
from prunelab.stages.surgery.plan import load_plan

if TYPE_CHECKING:
    from prunelab.context import RunContext


class PruneBase(StrictModel):
    """What every prune variant has beside its mode's settings: the tag, ``units``, ``criterion``, the checks against
    the stages around it, the version-1 dump. The stage's settings, :data:`PruneConfig`, are the union of the variants
    tagged by ``units`` (blocks by default): ``blocks`` (:class:`BlocksPrune`: ``num_blocks`` or ``ratio``,
    ``rounding``), ``width`` (:class:`WidthPrune`: ``ratio`` or ``layer_ratio``, ``allocation``, ``layers``,
    ``attention``, ``mlp``, ``compensation``, ``engines``, ``round_to``), ``hidden`` (:class:`HiddenPrune`: ``ratio``
    or ``layer_ratio``, ``norm_rescale``), ``sublayers`` (:class:`SublayersPrune`: ``num_sublayers`` or ``ratio``,
    ``sublayers``). A setting of another mode is an error naming it. :func:`prune_config` validates a mapping into
    its variant; a variant may be built directly (``BlocksPrune(type="prune", criterion="ppl", num_blocks=2)``).

    Migration: the flat spelling of version 1 still validates (``hidden: true`` → ``units: hidden``, ``owl_m`` →
    ``allocation: {type: owl, m}``, ``damping`` → ``compensation: {type: optimal, damping}``, ...:
    ``prunelab.stages.core.migrate``); ``v1_settings()`` gives the old flat dump, so old run directories ``--resume``.
    """

    type: Literal["prune"]
    units: str = Field("blocks", description="what to remove: a registered mode (stages.selection.config.SELECTIONS): "
                       "blocks | width | hidden | sublayers")
    criterion: str = Field(..., description="which computed criterion decides (see `score`)")

    @model_validator(mode="before")
    @classmethod
    def _version_1(cls, data: Any) -> Any:
        """A variant validated directly reads the version-1 spelling too (an old ``recipe.resolved.yaml``)."""
        return legacy.migrate(data, {u: set(allowed_keys(variant_class(u))) for u in SELECTIONS})

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
        refusal = propagation_refusal(pipeline_for(key, stages), self)  # propagate: pruned serves width + compensation
        return [refusal] if refusal else []

    def v1_settings(self) -> dict[str, Any]:
        """These settings as the flat version-1 class dumped them (the runner's legacy settings hash)."""
        return legacy.v1_settings(self)


@functools.cache
def variant_class(units: str) -> type[PruneBase]:
    """The prune stage's class for a registered mode: its settings (``SELECTIONS``) with the stage's fields, built
    once per mode, so a mode registered anywhere is a prune variant without an edit here (``BlocksPrune``, ...)."""
    settings = SELECTIONS.config(units)
    name = settings.__name__.removesuffix("Settings") + "Prune"
    return type(name, (settings, PruneBase), {"__doc__": settings.__doc__, "__module__": __name__})


BlocksPrune, WidthPrune, HiddenPrune, SublayersPrune = map(variant_class, ("blocks", "width", "hidden", "sublayers"))


def _variant(data: Any) -> PruneBase:
    """``data`` (a mapping in the new or version-1 spelling, or a variant) as the variant its ``units`` names; the
    modes are read from ``SELECTIONS`` now, so one registered after this module loaded is accepted."""
    if isinstance(data, PruneBase):
        return data
    variants = {u: variant_class(u) for u in SELECTIONS}
    data = legacy.migrate(data, {u: set(allowed_keys(c)) for u, c in variants.items()})
    return validate_selection(data, variants, legacy.explain_old)


# The prune stage's settings (the type of any field that holds them): a variant chosen by `units`, dumped whole;
# prune_config(mapping) validates one outside a recipe (the variant, or a ValidationError as in a recipe).
PruneConfig = Annotated[SerializeAsAny[PruneBase], BeforeValidator(_variant)]
prune_config: Callable[[Any], PruneBase] = TypeAdapter(PruneConfig).validate_python


def _apply(ctx: RunContext, plan: Any, side: dict[str, Any] | None = None) -> dict[str, Any]:
    from prunelab.stages.surgery.apply import apply_plan  # lazy: torch-free

    apply_plan(ctx.model, plan, side)
    after_plan(ctx.model, plan)  # streamed skeleton: the biases compensation will add; resident: nothing
    ctx.plan, ctx.state = plan, "pruned"
    plan.params_after = ctx.adapter.total_params()
    plan.achieved_ratio = round(1 - plan.params_after / plan.params_before, 6)
    ctx.model_info.update(params_after=plan.params_after, layers_after=ctx.adapter.num_blocks)
    return plan.outputs()


def run(ctx: RunContext, cfg: PruneBase) -> dict[str, Any]:
    pipeline = pipeline_for(ctx.stage_key, ctx.recipe.stages)
    if getattr(pipeline, "propagate", "dense") == "pruned":  # pass 2: the plan's compensation re-fitted block by block
        plan, side = propagated_width_plan(ctx.scores[cfg.criterion], cfg, ctx.model, ctx.activation_stats, ctx.scores,
                                           ctx.calibration, pipeline, score_batch_size(ctx.stage_key, ctx.recipe.stages),
                                           ctx.progress)
    else:
        make_plan = SELECTIONS.impl(cfg.units)
        plan, side = make_plan(ctx.scores[cfg.criterion], cfg, ctx.model, ctx.activation_stats, ctx.scores, ctx.calibration)
    outputs = _apply(ctx, plan, side)
    if ctx.is_main:
        if side:
            from safetensors.torch import save_file  # lazy: torch-free

            tmp = ctx.stage_dir / f".{plan.side_file}.tmp"
            save_file({k: v.contiguous() for k, v in side.items()}, str(tmp))
            tmp.replace(ctx.stage_dir / plan.side_file)
        atomic_write_json(ctx.stage_dir / "plan.json", plan.to_json())
    return outputs


def restore(ctx: RunContext, cfg: PruneBase, outputs: dict[str, Any], stage_dir: Path) -> None:
    plan = load_plan(json.loads((stage_dir / "plan.json").read_text()))
    side = None
    if plan.side_file:
        from safetensors.torch import load_file  # lazy: torch-free

        side = load_file(str(stage_dir / plan.side_file))
    _apply(ctx, plan, side)


register_stage("prune", PruneConfig, run, restore)
