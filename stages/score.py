"""Stage: score units with one or more criteria. Statistics come from ONE calibration pass.

Each criterion's result is saved as soon as it is done (``partial/<criterion>.json``), so a run
killed in the middle of scoring resumes without recomputing finished criteria.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.registry import register_stage
from stages import criteria as _criteria  # noqa: F401  (registers criteria, torch-free)
from stages.core.config import StrictModel
from stages.criteria.registry import criteria_for
from stages.criteria.settings import LacoSettings


class ScoreConfig(StrictModel):
    type: Literal["score"]
    units: Literal["blocks", "width"] = Field("blocks", description="blocks (depth) or heads/KV groups/MLP channels (width)")
    criteria: list[str] = Field(
        default_factory=list, description="criteria to compute; empty means those the later prune stages use"
    )
    batch_size: int = Field(1, ge=1, description="calibration windows per forward pass")
    laco: LacoSettings = Field(default_factory=LacoSettings, description="settings of the `laco` criterion")
    reduction: Literal["sum", "mean", "max", "prod"] = Field(
        "sum", description="width: how element importances of a coupled group's members combine (LLM-Pruner)"
    )

    @model_validator(mode="after")
    def _known(self) -> ScoreConfig:
        registry = criteria_for(self.units)
        bad = [n for n in self.criteria if n not in registry]
        if bad:
            raise ValueError(f"unknown {self.units} criterion {bad}; choose from {', '.join(registry.names())}")
        return self

    def effective_criteria(self, key: str, stages: dict[str, Any]) -> list[str]:
        if self.criteria:
            return list(self.criteria)
        keys = list(stages)
        later = [stages[k] for k in keys[keys.index(key) + 1 :]]
        return list(dict.fromkeys(s.criterion for s in later if getattr(s, "type", "") == "prune" and s.units == self.units))

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        names = self.effective_criteria(key, stages)
        if not names:
            return ["no criteria: list them in `criteria:` or add a later prune stage with `criterion:`"]
        problems = []
        registry = criteria_for(self.units)
        need_data = [n for n in names if registry.get(n).needs]
        if need_data and not any(stages[k].type == "calibrate" for k in seen):
            problems.append(f"criteria {need_data} need calibration data; add a `calibrate` stage before this one")
        iterative = [n for n in names if registry.get(n).iterative]
        keys = list(stages)
        if iterative and not any(stages[k].type == "prune" and stages[k].units == "blocks" for k in keys[keys.index(key) + 1 :]):
            problems.append(f"iterative criteria {iterative} stop at a target size: add a later `prune` stage")
        return problems


def _num_remove(ctx: Any) -> int:
    """Target block count of the later prune stage (iterative criteria stop there).

    Blocks of one decoder are equal in size, so the count does not depend on the criterion.
    """
    from stages.selection.blocks import num_blocks_for

    stage = next(s for _, s in ctx.later_stages() if getattr(s, "type", "") == "prune" and s.units == "blocks")
    return num_blocks_for(stage, ctx.adapter)


def run(ctx: Any, cfg: ScoreConfig) -> dict[str, Any]:
    from accelerate.logging import get_logger

    from stages.calibration.blocks import collect_block_stats
    from stages.core.files import atomic_write_json
    from stages.criteria.depth import CriterionInputs

    log = get_logger(__name__)
    if cfg.units == "width":
        return _run_width(ctx, cfg, log)
    CRITERIA = criteria_for("blocks")
    names = cfg.effective_criteria(ctx.stage_key, ctx.recipe.stages)
    partial = ctx.stage_dir / "partial"
    done = {n: json.loads((partial / f"{n}.json").read_text()) for n in names if (partial / f"{n}.json").is_file()}
    todo = [n for n in names if n not in done]
    if done:
        log.info(f"re-using finished criteria {sorted(done)} from {partial}", main_process_only=True)
    needs: set[str] = set().union(*(CRITERIA.get(n).needs for n in todo)) if todo else set()
    adapter = ctx.adapter
    stats = collect_block_stats(adapter, ctx.calibration, needs, cfg.batch_size, ctx.progress)
    for name in todo:
        spec = CRITERIA.get(name)
        t0 = time.perf_counter()
        inputs = CriterionInputs(
            units=list(range(adapter.num_blocks)), stats=stats, model=ctx.model, adapter=adapter,
            calibration=ctx.calibration, batch_size=cfg.batch_size,
            num_remove=_num_remove(ctx) if spec.iterative else None, seed=ctx.recipe.seed, progress=ctx.progress,
            options={"laco": cfg.laco.model_dump()},
        )
        result = spec.load()(inputs).to_json()
        result["seconds"] = round(time.perf_counter() - t0 + (stats.seconds if spec.needs else 0.0), 3)
        result["paper"] = spec.paper
        done[name] = result
        if ctx.is_main:
            atomic_write_json(partial / f"{name}.json", result)
        log.info(f"scored {name} in {result['seconds']:.1f}s", main_process_only=True)
    ctx.scores.update({n: done[n] for n in names})
    if ctx.is_main:
        atomic_write_json(ctx.stage_dir / "scores.json", {n: done[n] for n in names})
    return {"criteria": names, "calibration_pass_s": round(stats.seconds, 3)}


def _run_width(ctx: Any, cfg: ScoreConfig, log: Any) -> dict[str, Any]:
    """Width scoring: one calibration pass (hooks, plus one backward per batch for Taylor criteria)."""
    import torch

    from stages.calibration.width import collect_width_stats, summary_tensors
    from stages.core.files import atomic_write_json
    from stages.criteria.scoring import score_width, width_needs

    names = cfg.effective_criteria(ctx.stage_key, ctx.recipe.stages)
    later = [s for _, s in ctx.later_stages() if getattr(s, "type", "") == "prune" and s.units == "width"]
    hidden = any(s.hidden for s in later)
    needs = width_needs(names, hidden=hidden, hessian=any(s.compensation == "optimal" for s in later))
    stats = collect_width_stats(ctx.model, ctx.calibration, needs, cfg.batch_size, ctx.progress)
    results: dict[str, Any] = {}
    for name in names:
        results[name] = score_width(name, ctx.model, stats, ctx.recipe.seed, cfg.reduction, hidden)
        log.info(f"scored {name} (width) in {results[name]['seconds']:.1f}s", main_process_only=True)
    ctx.activation_stats = summary_tensors(stats)
    ctx.scores.update(results)
    if ctx.is_main:
        torch.save(ctx.activation_stats, ctx.stage_dir / "activation_means.pt")
        atomic_write_json(ctx.stage_dir / "scores.json", results)
    return {"criteria": names, "units": "width", "calibration_pass_s": round(stats.seconds, 3)}


def restore(ctx: Any, cfg: ScoreConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    ctx.scores.update(json.loads((stage_dir / "scores.json").read_text()))
    if cfg.units == "width":
        import torch

        ctx.activation_stats = torch.load(stage_dir / "activation_means.pt")


register_stage("score", ScoreConfig, run, restore)
