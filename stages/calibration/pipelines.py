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
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, WithJsonSchema, model_validator

from prunelab.stages.calibration.needs import refusals as need_refusals
from prunelab.stages.core.config import PathStr, StrictModel
from prunelab.stages.core.registry import Registry


class FullPipeline(StrictModel):
    """The whole model resident, one pass (plus one backward per batch for gradients)."""

    type: Literal["full"] = "full"


class SequentialPipeline(StrictModel):
    """One block resident at a time; the hidden states at the block boundary kept between blocks."""

    type: Literal["sequential"] = "sequential"
    propagate: Literal["dense"] = Field(
        "dense", description="what block i+1 sees: dense = the dense block i's outputs (the same statistics as full)")
    memory_budget_gb: float = Field(
        4.0, ge=0, description="boundary states held in memory up to this size; past it they are memory-mapped "
        "files in offload_dir")
    offload_dir: PathStr | None = Field(
        None, description="folder for boundary states past memory_budget_gb (none: a temporary folder, removed after)")

    @model_validator(mode="before")
    @classmethod
    def _pruned(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("propagate") == "pruned":
            raise ValueError("propagate: pruned feeds block i+1 the pruned block i's outputs, which needs the plan "
                             "applied block by block during calibration (issue 28 item 3) — not built yet; use "
                             "propagate: dense")
        return data


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
    from prunelab.stages.calibration.full import collect_stats

    return collect_stats(model, calibration, needs, batch_size, progress)


register_pipeline("full", FullPipeline, _full)
register_pipeline("sequential", SequentialPipeline, "prunelab.stages.calibration.sequential:collect_sequential")
