"""Calibration pipelines: how the calibration data is driven past the observers (``full`` | ``sequential``).

Each pipeline is registered with its settings class and its runner, ``(model, calibration, needs, batch_size,
progress, settings) -> CalibrationStats`` (a ``"module:function"`` string resolved on first use: validating a
recipe stays torch-free). The recipe picks one in the calibrate stage, ``pipeline: {type: sequential, …}`` (or
the bare name); the score stage's pass runs through it. A need a pipeline cannot collect is refused at
``--dry-run`` with the reason registered beside the need (``prunelab.stages.calibration.needs``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PlainValidator, WithJsonSchema, field_validator, model_validator

from prunelab.stages.calibration.needs import refusals as need_refusals
from prunelab.stages.core.config import PathStr, StrictModel
from prunelab.stages.core.registry import Registry


class FullPipeline(StrictModel):
    """The whole model resident, one pass (plus one backward per batch for gradients)."""

    type: Literal["full"] = "full"


class SequentialPipeline(StrictModel):
    """One block resident at a time; the hidden states at the block boundary kept between blocks."""

    type: Literal["sequential"] = "sequential"
    # added later: left out of dumps at their defaults
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"target": "dense", "checkpoint_every": None}
    propagate: Literal["dense", "pruned"] = Field(
        "dense", description="what block i+1 sees: dense = the dense block i's outputs (the same statistics as full); "
        "pruned = the scores still come from the dense pass, then the prune stage applies the plan block by block and "
        "re-fits compensation on the outputs of the already-pruned blocks (width plans with bias/optimal compensation)")
    target: Literal["dense", "self"] = Field(
        "dense", description="propagate: pruned only — what the re-fitted layer matches on the pruned-path inputs: "
        "dense = the dense layer's output on the dense inputs (corrects the error carried in, needs the cross term "
        "X'ᵀX); "
        "self = its own dense weights on the pruned-path inputs (repairs only this block's removal)")
    memory_budget_gb: float = Field(
        4.0, ge=0, description="boundary states held in memory up to this size; past it they are memory-mapped "
        "files in offload_dir")
    offload_dir: PathStr | None = Field(
        None, description="folder for boundary states past memory_budget_gb (none: a temporary folder, removed after)")
    checkpoint_every: int | None = Field(
        None, description="Taylor criteria (the block-wise backward) and LaCo's trials: keep every k-th boundary state "
        "of the dense forward and recompute the ones between from it on the way down (one more forward per block); 1 "
        "keeps them all; none: ceil(sqrt(L)) (LaCo: of the S blocks a trial can start at), which minimises the states "
        "stored (L/k + k)")

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_every(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"checkpoint_every: {value} — keep every k-th boundary state, k >= 1 (1 keeps every one; "
                             "leave it out for ceil(sqrt(L)))")
        return value

    @model_validator(mode="after")
    def _target_needs_pruned(self) -> SequentialPipeline:
        if self.propagate == "dense" and self.target != "dense":
            raise ValueError(f"target: {self.target} says what compensation fits on the pruned path; it needs "
                             "propagate: pruned (or remove target)")
        return self


# Why pruned propagation cannot serve a prune stage, by its units (None: it can, given a compensation to re-fit).
_NOT_PROPAGATED = {
    "blocks": "block removal fits nothing to the calibration inputs after the plan, so the result would equal "
              "propagate: dense",
    "sublayers": "sublayer removal fits nothing to the calibration inputs after the plan, so the result would equal "
                 "propagate: dense",
    "hidden": "hidden channels are cut from every block at once (embedding, norms, every projection), which a "
              "block-by-block walk cannot apply; not built",
}


def propagation_refusal(pipeline: Any, prune: Any) -> str | None:
    """Why ``pipeline`` (propagate: pruned) cannot serve the prune stage ``prune``, or None (torch-free: --dry-run)."""
    if getattr(pipeline, "propagate", "dense") != "pruned":
        return None
    why = _NOT_PROPAGATED.get(prune.units)
    if why is None and prune.units != "width":
        why = f"units: {prune.units} is not a width plan"
    comp = getattr(getattr(prune, "compensation", None), "type", "none")
    if why is None and comp not in ("bias", "optimal"):
        why = (f"compensation: {comp} re-fits nothing on the propagated inputs, so the result would equal propagate: "
               "dense; set compensation: optimal or bias")
    return None if why is None else f"propagate: pruned — {why}; or use propagate: dense"


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    settings: type[StrictModel]
    run: str | Callable[..., Any]

    def load(self) -> Callable[..., Any]:
        if not isinstance(self.run, str):
            return self.run
        module, _, fn = self.run.partition(":")
        return getattr(importlib.import_module(module), fn)


PIPELINES: Registry[PipelineSpec] = Registry("calibration pipeline")


def register_pipeline(name: str, settings: type[StrictModel], run: str | Callable[..., Any]) -> PipelineSpec:
    """Register a pipeline; its settings class must have ``type: Literal[name]``."""
    return PIPELINES.register(name, PipelineSpec(name, settings, run))


def _validated(value: Any) -> StrictModel:
    if isinstance(value, str):
        value = {"type": value}
    if isinstance(value, StrictModel) and value.__class__ in {PIPELINES.get(n).settings for n in PIPELINES}:
        return value
    if not isinstance(value, dict) or "type" not in value:
        raise ValueError(f"give a pipeline name ({' | '.join(PIPELINES)}) or {{type: <name>, …}}")
    if value["type"] not in PIPELINES:
        raise ValueError(f"unknown calibration pipeline {value['type']!r}; choose one of {', '.join(PIPELINES)}")
    return PIPELINES.get(value["type"]).settings.model_validate(value)


PipelineConfig = Annotated[Any, PlainValidator(_validated),
                           WithJsonSchema({"type": "object", "description": "a registered calibration pipeline"})]


def refusals(pipeline: Any, needs: Iterable[str]) -> dict[str, str]:
    """need → why ``pipeline`` cannot collect it (empty when it can collect them all)."""
    return need_refusals(pipeline.type, needs)


def pipeline_for(key: str, stages: dict[str, Any]) -> Any:
    """The pipeline of the last calibrate stage before stage ``key`` of a recipe (full when there is none)."""
    keys = list(stages)
    before = [stages[k] for k in keys[: keys.index(key)] if getattr(stages[k], "type", None) == "calibrate"]
    pipeline = getattr(before[-1], "pipeline", None) if before else None
    return pipeline if pipeline is not None else FullPipeline()


def collect(model: Any, calibration: Any, needs: Iterable[str], batch_size: int = 1, progress: bool = True,
            pipeline: Any = None) -> Any:
    """``CalibrationStats`` of ``needs`` from ``pipeline`` (default: full); refused needs are an error naming why."""
    pipeline = pipeline if pipeline is not None else FullPipeline()
    needs = set(needs)
    refused = refusals(pipeline, needs)
    if refused:
        raise ValueError(f"the {pipeline.type} calibration pipeline cannot collect "
                         + "; ".join(f"{n!r}: {why}" for n, why in refused.items()) + "; use pipeline: full")
    return PIPELINES.get(pipeline.type).load()(model, calibration, needs, batch_size, progress, pipeline)


def _full(model: Any, calibration: Any, needs: set[str], batch_size: int, progress: bool, _settings: Any) -> Any:
    from prunelab.stages.calibration.full import collect_stats  # lazy: torch-free

    return collect_stats(model, calibration, needs, batch_size, progress)


register_pipeline("full", FullPipeline, _full)
register_pipeline("sequential", SequentialPipeline, "prunelab.stages.calibration.sequential:collect_sequential")
