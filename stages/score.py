"""Stage: score units with one or more criteria. Statistics come from ONE calibration pass.

Depth and width take the same path (``prunelab.stages.criteria.scoring.score_criteria``): each criterion's result is saved
as soon as it is done (``partial/<criterion>.json``), so a run killed in the middle of scoring resumes without
recomputing finished criteria. Width scoring also leaves the projection-input summaries that the prune stage
reads for compensation and allocation (``ctx.activation_stats``, saved here as ``activation_means.pt``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from prunelab.registry import register_stage
from prunelab.stages.calibration.pipelines import pipeline_for
from prunelab.stages.core.config import StrictModel
from prunelab.stages.core.files import atomic_write_json
from prunelab.stages.criteria.registry import criteria_for, kind_of, validate_settings  # the package registers all
from prunelab.stages.criteria.scoring import PartialResults, needs_for, score_criteria
from prunelab.stages.criteria.settings import migrate_version_1, version_1_keys
from prunelab.stages.selection.blocks import num_blocks_for

if TYPE_CHECKING:
    from prunelab.context import RunContext


class ScoreConfig(StrictModel):
    type: Literal["score"]
    units: Literal["blocks", "width"] = Field("blocks", description="blocks (depth) or heads/KV groups/MLP channels (width)")
    criteria: list[str] = Field(
        default_factory=list, description="criteria to compute; empty means those the later prune stages use"
    )
    batch_size: int = Field(1, ge=1, description="calibration windows per forward pass")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="each criterion's own settings, checked against its settings model, e.g. "
        "{laco: {threshold: 0.4}} or {taylor: {reduction: mean}} (version 1's top-level `laco:`/`reduction:` migrate)"
    )

    @model_validator(mode="before")
    @classmethod
    def _version_1(cls, data: Any) -> Any:
        return migrate_version_1(data) if isinstance(data, dict) else data

    @field_validator("settings")
    @classmethod
    def _settings(cls, raw: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return validate_settings(kind_of(info.data["units"]), raw) if "units" in info.data else raw

    @model_validator(mode="after")
    def _known(self) -> ScoreConfig:
        registry = criteria_for(self.units)
        bad = [n for n in self.criteria if n not in registry]
        if bad:
            raise ValueError("; ".join(registry.unknown(n, f"{self.units} criterion") for n in bad))
        return self

    def v1_settings(self) -> dict[str, Any]:
        """The flat dump of version 1, so run directories made before still resume (``pipeline.runner``)."""
        return {"type": self.type, "units": self.units, "criteria": list(self.criteria), "batch_size": self.batch_size,
                **version_1_keys(kind_of(self.units), self.criteria, self.settings)}

    def effective_criteria(self, key: str, stages: dict[str, Any]) -> list[str]:
        if self.criteria:
            return list(self.criteria)
        later = _later_prunes(key, stages, self.units)  # a width prune may name expert criteria too
        return list(dict.fromkeys(n for s in later for n in getattr(s, "criteria", lambda s=s: [s.criterion])()))

    def calibration_needs(self, key: str, stages: dict[str, Any], extra_only: bool = False) -> set[str]:
        """What this stage's pass collects: its criteria's needs and, for width, what later prunes need beyond them
        (``hidden`` gradients for hidden channels, ``hessian`` for optimal compensation; ``extra_only``: those)."""
        prunes = _later_prunes(key, stages, self.units) if self.units == "width" else []
        optimal = any(getattr(getattr(s, "compensation", None), "type", None) == "optimal" for s in prunes)
        extra = ({"hidden"} if any(s.units == "hidden" for s in prunes) else set()) | ({"hessian"} if optimal else set())
        return extra if extra_only else needs_for(kind_of(self.units), self.effective_criteria(key, stages), extra)

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        names = self.effective_criteria(key, stages)
        if not names:
            return ["no criteria: list them in `criteria:` or add a later prune stage with `criterion:`"]
        problems = [f"settings.{n}: this stage does not score {n!r}; remove it" for n in self.settings if n not in names]
        registry = criteria_for(self.units)
        need_data = [n for n in names if registry.get(n).needs]
        if need_data and not any(stages[k].type == "calibrate" for k in seen):
            problems.append(f"criteria {need_data} need calibration data; add a `calibrate` stage before this one")
        iterative = [n for n in names if registry.get(n).iterative]
        if iterative and not _later_prunes(key, stages, "blocks"):
            problems.append(f"iterative criteria {iterative} stop at a target size: add a later `prune` stage")
        return problems


def _later_prunes(key: str, stages: dict[str, Any], units: str) -> list[Any]:
    """Prune stages after ``key`` that read scores of ``units`` (hidden channels are scored by width criteria)."""
    keys, kind = list(stages), kind_of(units)
    later = [stages[k] for k in keys[keys.index(key) + 1 :] if getattr(stages[k], "type", "") == "prune"]
    return [s for s in later if s.units in ("blocks", "width", "hidden", "sublayers") and kind_of(s.units) == kind]


def _inputs_key(ctx: RunContext) -> str:
    """What partial/ results are valid for: the whole recipe (iterative criteria depend on the later prune target)."""
    recipe = json.dumps({**ctx.recipe.resolved(), "output_dir": None}, sort_keys=True, default=str)
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def run(ctx: RunContext, cfg: ScoreConfig) -> dict[str, Any]:
    from accelerate.logging import get_logger  # lazy: torch-free

    log = get_logger(__name__)
    kind = kind_of(cfg.units)
    names = cfg.effective_criteria(ctx.stage_key, ctx.recipe.stages)
    prunes = _later_prunes(ctx.stage_key, ctx.recipe.stages, cfg.units)
    extra = cfg.calibration_needs(ctx.stage_key, ctx.recipe.stages, extra_only=True)
    results, stats = score_criteria(
        kind, names, ctx.model, ctx.calibration, settings=cfg.settings, seed=ctx.recipe.seed, batch_size=cfg.batch_size,
        extra_needs=extra, hidden="hidden" in extra,
        num_remove=lambda: num_blocks_for(prunes[0], ctx.adapter) if prunes[0].units == "blocks" else None,  # blocks are equal in size
        prune=prunes[0] if prunes else None,  # sublayer_sleb reads a `units: sublayers` target
        partial=PartialResults(ctx.stage_dir / "partial", _inputs_key(ctx), write=ctx.is_main),
        progress=ctx.progress, log=lambda m: log.info(m, main_process_only=True),
        pipeline=pipeline_for(ctx.stage_key, ctx.recipe.stages),
    )
    ctx.scores.update(results)
    out: dict[str, Any] = {"criteria": names, "calibration_pass_s": round(stats.seconds, 3)}
    if kind == "width":
        import torch  # lazy: torch-free

        from prunelab.stages.calibration.width import summary_tensors  # lazy: torch-free

        ctx.activation_stats = summary_tensors(stats)
        if ctx.is_main:
            torch.save(ctx.activation_stats, ctx.stage_dir / "activation_means.pt")
        out["units"] = "width"
    if ctx.is_main:
        atomic_write_json(ctx.stage_dir / "scores.json", results)
    return out


def restore(ctx: RunContext, cfg: ScoreConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    ctx.scores.update(json.loads((stage_dir / "scores.json").read_text()))
    if cfg.units == "width":
        import torch  # lazy: torch-free

        ctx.activation_stats = torch.load(stage_dir / "activation_means.pt", weights_only=True)


register_stage("score", ScoreConfig, run, restore)
