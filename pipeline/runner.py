"""Execute a validated recipe: stages in order over one RunContext, each leaving ``done.json``.

``--resume`` re-uses a stage whose ``done.json`` carries the same chained config hash (its settings
and every setting before it, less the fields a config declares ``NOT_HASHED``: they change no result) AND the same chained hash of its input files' content (the model's weights,
config and tokenizer; every data file a setting names — see ``prunelab.stages.core.fingerprint``), restoring its
artifacts (calibration tokens, scores, plan) instead of recomputing; the first stage that is not done, and
everything after it, runs again, and the log says which setting or file changed.

One process at a time works in a run directory (``prunelab.stages.core.lock``); a resumed run first removes the temporary
files and folders that a killed process left (``prunelab.stages.core.files.clean_stale_temps``).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from prunelab.context import RunContext
from prunelab.metrics import build_metrics
from prunelab.recipe import RecipeBase
from prunelab.registry import load_stages
from prunelab.report import write_report
from prunelab.rundir import (
    RunDirError,
    atomic_write_json,
    atomic_write_text,
    chain_hash,
    match_done,
    prepare_run_dir,
    write_done,
)
from prunelab.stages.core.config import HASH_CONTEXT, input_files
from prunelab.stages.core.files import clean_stale_temps
from prunelab.stages.core.fingerprint import describe_changes, digest, file_fingerprint
from prunelab.stages.core.lock import RunLock, RunLockedError
from prunelab.stages.io.sources import alias_dirs, classify


class RunError(RuntimeError):
    """A run that cannot start or continue, with what to do about it."""


def _stage_list(recipe: RecipeBase) -> list[tuple[str, str, Any]]:
    """(folder key, stage type, config) for every stage, the implicit load first."""
    return [("load", "load", recipe.model)] + [(k, c.type, c) for k, c in recipe.stages.items()]


def _spec(stage_type: str) -> Any:
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


MODEL_FILES = (".json", ".safetensors", ".bin", ".pt", ".gguf", ".model", ".txt", ".jinja", ".tiktoken")


@functools.lru_cache(maxsize=1024)
def _file_fingerprint_cached(path: str, size: int, mtime_ns: int, inode: int) -> dict[str, Any]:
    """One fingerprint per file state within a process (the same test text is read by several evaluate stages);
    across processes — every resume — the content is read again: timestamps are never trusted between runs."""
    return file_fingerprint(path)


def _fingerprint(path: Path, folder: bool = False) -> Any:
    if folder:
        return {p.name: _fingerprint(p) for p in sorted(path.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.name.endswith(MODEL_FILES)}
    st = path.stat()
    return _file_fingerprint_cached(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def data_inputs(cfg: Any, where: str) -> dict[str, Any]:
    """``{dotted field: {"path", "fingerprint"}}`` for every local file a stage's settings name (text, JSONL, task
    files; ``data_files`` globs expanded). A file that is missing is recorded as such: the stage reports it when it runs."""
    out: dict[str, Any] = {}
    for field, file in input_files(cfg, where):
        matches = [Path(file)] if Path(file).is_file() else [Path(m) for m in sorted(glob.glob(file)) if Path(m).is_file()]
        if not matches:
            out[field] = {"path": file, "fingerprint": None}
        elif len(matches) == 1 and str(matches[0]) == file:
            out[field] = {"path": file, "fingerprint": _fingerprint(matches[0])}
        else:
            out[field] = {"path": file, "fingerprint": {str(m): _fingerprint(m) for m in matches}}
    return out


def model_inputs(cfg: Any) -> dict[str, Any]:
    """``{"model.source": {"path", "fingerprint"}}``: the files the load stage read, taken after it ran (an alias or a
    hub model is fetched into the cache on first use). The files of a local folder or of the alias's converted copy
    (config, weights, index, tokenizer), or the .gguf file; a built-in tiny model is built from code (no files); a hub
    model not found in the local cache is keyed by its id and revision only."""
    src = classify(cfg.source, cfg.gguf_file)
    if src.kind == "tiny":
        return {}
    if src.kind == "alias":
        gguf_dir, hf_dir = alias_dirs(src.path)
        return {"model.source": {"path": str(hf_dir), "fingerprint": _fingerprint(hf_dir, folder=True)}}
    if src.kind == "gguf":
        file = Path(src.path) / str(src.gguf_file)
        return {"model.source": {"path": str(file), "fingerprint": _fingerprint(file)}}
    if src.kind == "local":
        return {"model.source": {"path": src.path, "fingerprint": _fingerprint(Path(src.path), folder=True)}}
    snapshot = _hub_snapshot(src.path, cfg.revision)
    if snapshot is None:
        return {"model.source": {"path": src.path, "fingerprint": {"revision": cfg.revision}}}
    return {"model.source": {"path": str(snapshot), "fingerprint": _fingerprint(snapshot, folder=True)}}


def _hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The local hub-cache folder of ``repo`` at ``revision`` (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache  # lazy: startup

        hit = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 (an odd cache layout means: not cached)
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _changed_since_last_run(stage_dir: Path, inputs: dict[str, Any]) -> list[str]:
    """What differs between the inputs an earlier run of this stage recorded and ``inputs`` ([] if nothing, or
    nothing recorded)."""
    try:
        old = json.loads((stage_dir / "done.json").read_text()).get("inputs")
    except (OSError, ValueError, AttributeError):
        return []
    return describe_changes(old, inputs) if isinstance(old, dict) else []


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
    import torch  # lazy: torch-free
    from accelerate import Accelerator, PartialState  # lazy: torch-free

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
        from transformers.integrations import unset_hf_deepspeed_config  # lazy: torch-free

        unset_hf_deepspeed_config()
    return accelerator


def execute(recipe: RecipeBase, run_dir: Path, resume: bool = False, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """Run every stage; return the metrics (on the main process) and write ``metrics.json``.

    The main process holds the run directory's lock from before ``--force`` deletes anything to the end."""
    from accelerate.logging import get_logger  # lazy: torch-free

    accelerator = make_accelerator(recipe)
    log = get_logger(__name__)
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            try:
                lock = stack.enter_context(RunLock(run_dir))
            except RunLockedError as exc:
                raise RunError(str(exc)) from None
            except OSError as exc:
                raise RunError(f"cannot lock the run directory {run_dir} ({exc.strerror}: {exc.filename}); "
                               f"output_dir must be a folder you can write to") from None
            if lock.took_over:
                log.warning(f"took over the lock of {run_dir} left by a process that is gone ({lock.took_over})",
                            main_process_only=True)
            try:
                prepare_run_dir(run_dir, resume=resume, force=force, name=recipe.name)
            except RunDirError as exc:
                raise RunError(str(exc)) from None
            if resume:
                for path in clean_stale_temps(run_dir):
                    log.info(f"removed {path.relative_to(run_dir)}, left by a killed process", main_process_only=True)
            atomic_write_text(run_dir / "recipe.resolved.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
        accelerator.wait_for_everyone()
        metrics = _run_stages(recipe, run_dir, accelerator, resume, progress)
    return metrics


def _run_stages(recipe: RecipeBase, run_dir: Path, accelerator: Any, resume: bool, progress: bool) -> dict[str, Any] | None:
    from accelerate.logging import get_logger  # lazy: torch-free
    from accelerate.utils import set_seed  # lazy: torch-free

    log = get_logger(__name__)
    ctx = RunContext(recipe=recipe, run_dir=run_dir, accelerator=accelerator, resume=resume,
                     progress=progress and accelerator.is_local_main_process)
    previous = legacy = inputs_chain = ""
    rerun = False  # a stage before this one was not restored (its reason was logged)
    for index, (key, stage_type, cfg) in enumerate(_stage_list(recipe), start=1):
        spec = _spec(stage_type)
        stage_dir = run_dir / f"{index:02d}-{key}"
        previous = chain_hash(previous, stage_type, cfg.model_dump(mode="json", context=HASH_CONTEXT))  # NOT_HASHED out
        legacy = chain_hash(legacy, stage_type, legacy_settings(cfg))
        ctx.stage_key, ctx.stage_dir = key, stage_dir
        stage_dir.mkdir(parents=True, exist_ok=True)
        set_seed(recipe.seed)
        inputs = data_inputs(cfg, "model" if stage_type == "load" else f"stages.{key}")
        stage_chain = chain_hash(inputs_chain, key, {k: digest(v) for k, v in inputs.items()})
        done, why = None, None
        if resume and spec.restore is not None:
            done, why = match_done(stage_dir, previous, legacy, stage_chain, inputs)
        if why is not None:
            later = "" if rerun else "; running it and every later stage again"
            log.info(f"{stage_dir.name}: not restored: {why}{later}", main_process_only=True)
            rerun = True
        t0 = time.perf_counter()
        if done is not None:
            try:
                spec.restore(ctx, cfg, done["outputs"], stage_dir)
                log.info(f"{stage_dir.name}: restored from a finished run", main_process_only=True)
                seconds = done["seconds"]
            except FileNotFoundError as exc:
                log.warning(f"{stage_dir.name}: cannot restore ({exc}); running it again", main_process_only=True)
                done = None
        if done is not None and done.get("legacy_inputs") and accelerator.is_main_process:
            log.warning(f"{stage_dir.name}: finished before prunelab recorded its input files; trusting them as they are "
                        "now (later changes will be detected)", main_process_only=True)
            write_done(stage_dir, previous, seconds, done["outputs"], inputs, stage_chain, finished=done.get("finished"))
        if done is None:
            log.info(f"{stage_dir.name}: running", main_process_only=True)
            outputs = spec.run(ctx, cfg)
            seconds = time.perf_counter() - t0
            if stage_type == "load":  # what it read, once it has been fetched into the cache
                inputs = {**inputs, **model_inputs(cfg)}
                stage_chain = chain_hash(inputs_chain, key, {k: digest(v) for k, v in inputs.items()})
                changes = _changed_since_last_run(stage_dir, inputs) if resume else []
                if changes:  # load always runs; say why the stages after it will not be restored
                    log.info(f"{stage_dir.name}: {'; '.join(changes)}; every later stage runs again", main_process_only=True)
                    rerun = True
            if accelerator.is_main_process:
                write_done(stage_dir, previous, seconds, outputs, inputs, stage_chain)
        inputs_chain = stage_chain
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
    write_report(run_dir, metrics, ctx.scores, ctx.plan)
    return metrics
