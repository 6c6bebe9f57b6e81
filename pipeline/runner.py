"""Execute a validated recipe: stages in order over one RunContext, each leaving ``done.json``.

``--resume`` re-uses a stage whose ``done.json`` carries the same chained config hash (its settings
and every setting before it), restoring its artifacts (calibration tokens, scores, plan) instead of
recomputing; the first stage that is not done, and everything after it, runs again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.recipe import RecipeBase
from pipeline.rundir import (
    RunDirError,
    atomic_write_json,
    atomic_write_text,
    chain_hash,
    prepare_run_dir,
    read_done,
    write_done,
)

if TYPE_CHECKING:
    from pipeline.context import RunContext


class RunError(RuntimeError):
    """A run that cannot start or continue, with what to do about it."""


def _stage_list(recipe: RecipeBase) -> list[tuple[str, str, Any]]:
    """(folder key, stage type, config) for every stage, the implicit load first."""
    return [("load", "load", recipe.model)] + [(k, c.type, c) for k, c in recipe.stages.items()]


def _spec(stage_type: str) -> Any:
    from pipeline.registry import load_stages

    return load_stages().get(stage_type)


def _check_model(ctx: RunContext) -> None:
    """Targets that need the loaded model's size, checked before calibration or scoring starts."""
    adapter = ctx.adapter
    sizes = adapter.block_param_counts()
    geos = adapter.geometries()
    problems = []
    for key, cfg in ctx.recipe.stages.items():
        check = getattr(cfg, "check_model", None)
        if check is not None:
            problems += [f"stages.{key}: {m}" for m in check(len(sizes), adapter.total_params(), sum(sizes) / len(sizes), geos)]
    if problems:
        raise RunError("; ".join(problems))


def legacy_settings(cfg: Any) -> dict[str, Any]:
    """The settings as the flat schema of version 1 dumped them, so run directories made before the typed
    configs still ``--resume`` (their ``done.json`` hashes chain these). A config whose shape changed defines
    ``v1_settings()``; the others dump as they always did."""
    v1 = getattr(cfg, "v1_settings", None)
    return v1() if v1 is not None else cfg.model_dump(mode="json")


def make_accelerator(recipe: RecipeBase) -> Any:
    """The run's Accelerator. Two things accelerate does not do by itself:

    - Several processes without a GPU: accelerate leaves the backend unset, so ``num_processes``
      reads 1 on every rank of a 2-process world and no data is sharded. For DeepSpeed, naming the
      backend ("gloo") makes it read the real world size; for DDP, ``cpu=True`` selects its
      MULTI_CPU (gloo) path. Both are proven by tests with two CPU processes.
    - Models are built whole under ZeRO-3 (see below); only ``prepare`` in recovery shards them.
    - Gradient accumulation follows from the recipe's GLOBAL batch and the number of processes.
    """
    import os

    import torch
    from accelerate import Accelerator, PartialState

    cpu = False
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not torch.cuda.is_available():
        if deepspeed:  # the shared state is created once; Accelerator() below reuses it
            PartialState(backend="gloo")
        else:  # torchrun-launched DDP on CPU: accelerate's MULTI_CPU path (gloo) needs cpu=True
            cpu = True
            PartialState(cpu=True)
    processes = PartialState().num_processes
    recovers = [c for c in recipe.stages.values() if c.type == "recover"]
    try:
        accum = recovers[0].accumulation(processes) if recovers else 1
    except ValueError as exc:
        raise RunError(str(exc)) from None
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=accum)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and not plugin.zero3_init_flag:
        # accelerate registers its DeepSpeed config with transformers even with zero3_init_flag false,
        # and transformers then partitions EVERY model it builds (zero.Init): the tiny Llama's embedding
        # came out with 0 rows per rank, and a main-process-only reload in export deadlocked. Pruning
        # needs full weights; ZeRO-3 still shards the recovery model when prepare() hands it over.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator


def execute(recipe: RecipeBase, run_dir: Path, resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """Run every stage; return the metrics (on the main process) and write ``metrics.json``."""
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed

    from pipeline.context import RunContext
    from pipeline.metrics import build_metrics

    accelerator = make_accelerator(recipe)
    log = get_logger(__name__)
    if accelerator.is_main_process:
        try:
            prepare_run_dir(run_dir, resume=resume, force=force)
        except RunDirError as exc:
            raise RunError(str(exc)) from None
        atomic_write_text(run_dir / "recipe.resolved.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
    accelerator.wait_for_everyone()
    ctx = RunContext(recipe=recipe, run_dir=run_dir, accelerator=accelerator, resume=resume,
                     progress=progress and accelerator.is_local_main_process)
    previous = legacy = ""
    for index, (key, stage_type, cfg) in enumerate(_stage_list(recipe), start=1):
        spec = _spec(stage_type)
        stage_dir = run_dir / f"{index:02d}-{key}"
        previous = chain_hash(previous, stage_type, cfg.model_dump(mode="json"))
        legacy = chain_hash(legacy, stage_type, legacy_settings(cfg))
        ctx.stage_key, ctx.stage_dir = key, stage_dir
        stage_dir.mkdir(parents=True, exist_ok=True)
        set_seed(recipe.seed)
        done = read_done(stage_dir, previous, legacy) if resume and spec.restore is not None else None
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
    from pipeline.report import write_report

    write_report(run_dir, metrics, ctx.scores, ctx.plan)
    return metrics
