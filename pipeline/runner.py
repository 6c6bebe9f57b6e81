"""Execute a validated recipe: stages in order over one RunContext, each leaving ``done.json``.

``--resume`` re-uses a stage whose ``done.json`` carries the same chained config hash (its settings
and every setting before it), restoring its artifacts (calibration tokens, scores, plan) instead of
recomputing; the first stage that is not done, and everything after it, runs again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.recipe import RecipeBase
from pipeline.rundir import (
    RunDirError, atomic_write_json, atomic_write_text, chain_hash, prepare_run_dir, read_done, write_done,
)


class RunError(RuntimeError):
    """A run that cannot start or continue, with what to do about it."""


def _stage_list(recipe: RecipeBase) -> list[tuple[str, str, Any]]:
    """(folder key, stage type, config) for every stage, the implicit load first."""
    return [("load", "load", recipe.model)] + [(k, c.type, c) for k, c in recipe.stages.items()]


def _spec(stage_type: str) -> Any:
    from pipeline.registry import STAGES, StageSpec
    from stages import load

    if stage_type == "load":
        return StageSpec("load", type(None), load.run, None)
    return STAGES.get(stage_type)


def _check_model(ctx: Any) -> None:
    """Targets that need the loaded model's size, checked before calibration or scoring starts."""
    from stages.width_stats import geometry

    adapter = ctx.adapter
    sizes = adapter.block_param_counts()
    geos = [geometry(layer) for layer in adapter.layers]
    problems = []
    for key, cfg in ctx.recipe.stages.items():
        check = getattr(cfg, "check_model", None)
        if check is not None:
            problems += [f"stages.{key}: {m}" for m in check(len(sizes), adapter.total_params(), sum(sizes) / len(sizes), geos)]
    if problems:
        raise RunError("; ".join(problems))


def execute(recipe: RecipeBase, run_dir: Path, resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """Run every stage; return the metrics (on the main process) and write ``metrics.json``."""
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed

    from pipeline.context import RunContext
    from pipeline.metrics import build_metrics

    accelerator = Accelerator()
    log = get_logger(__name__)
    if accelerator.is_main_process:
        try:
            prepare_run_dir(run_dir, resume=resume, force=force)
        except RunDirError as exc:
            raise RunError(str(exc)) from None
        atomic_write_text(run_dir / "recipe.resolved.yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    accelerator.wait_for_everyone()
    ctx = RunContext(recipe=recipe, run_dir=run_dir, accelerator=accelerator, progress=progress and accelerator.is_local_main_process)
    previous = ""
    for index, (key, stage_type, cfg) in enumerate(_stage_list(recipe), start=1):
        spec = _spec(stage_type)
        stage_dir = run_dir / f"{index:02d}-{key}"
        previous = chain_hash(previous, stage_type, cfg.model_dump(mode="json"))
        ctx.stage_key, ctx.stage_dir = key, stage_dir
        stage_dir.mkdir(parents=True, exist_ok=True)
        set_seed(recipe.seed)
        done = read_done(stage_dir, previous) if resume and spec.restore is not None else None
        t0 = time.perf_counter()
        if done is not None:
            try:
                spec.restore(ctx, cfg, done["outputs"], stage_dir)
                log.info(f"{stage_dir.name}: restored from a finished run", main_process_only=True)
                seconds = done["seconds"]
            except FileNotFoundError as exc:
                log.warning(f"{stage_dir.name}: cannot restore ({exc}); running it again", main_process_only=True)
                done = None
        if done is None:
            log.info(f"{stage_dir.name}: running", main_process_only=True)
            outputs = spec.run(ctx, cfg)
            seconds = time.perf_counter() - t0
            if accelerator.is_main_process:
                write_done(stage_dir, previous, seconds, outputs)
        ctx.timings[stage_type] = ctx.timings.get(stage_type, 0.0) + seconds
        if stage_type == "load":
            _check_model(ctx)
        if accelerator.is_main_process:
            atomic_write_json(run_dir / "metrics.json", build_metrics(ctx))
        accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    metrics = build_metrics(ctx)
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics
