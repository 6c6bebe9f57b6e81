"""LoRA / QLoRA / full training under accelerate (one process, DDP or DeepSpeed), in torchtune's recipe shape:
:func:`setup` → :func:`loss_step` → :func:`train` → :func:`save`, driven by :func:`recover_model`.

Why this shape:
- The GLOBAL batch is fixed by the recipe; gradient accumulation = batch / (micro × processes), so one
  process and two processes see the same samples per optimizer step and reach the same weights.
- The sample order is a seeded permutation shared by every rank; accelerate shards it by batches.
  Each rank's consumed indices are gathered to the main process and written out as proof.
- Checkpoints (:mod:`prunelab.stages.recovery.checkpoints`) hold only the adapter plus optimizer, scheduler and RNG
  states; ``--resume`` loads the newest and skips the batches already consumed (``skip_first_batches``),
  so the resumed run ends with the same loss as an uninterrupted one.
- The loss is looked up by name (:mod:`prunelab.stages.recovery.losses`); a distillation loss gets the frozen dense
  teacher, called on the same micro-batch (every rank holds it under DDP and ZeRO-1/2; under ZeRO-3 it is
  sharded for inference by its own DeepSpeed engine). The model, its merge and the adapter's gathering
  live in :mod:`prunelab.stages.recovery.model`, the plain-peft speed baseline in :mod:`prunelab.stages.recovery.plain_loop`.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from tqdm.auto import tqdm
from transformers import get_scheduler

from prunelab.stages.core.files import atomic_write_json
from prunelab.stages.evaluation.memory import peak_memory_mb
from prunelab.stages.io.models import resolve_dtype
from prunelab.stages.recovery import trackers
from prunelab.stages.recovery.checkpoints import Checkpoints, settings_hashes
from prunelab.stages.recovery.config import RecoverySettings
from prunelab.stages.recovery.data import build_dataset, make_loader
from prunelab.stages.recovery.losses import Loss, Teacher, block_pairs, get_loss
from prunelab.stages.recovery.model import (
    apply_trained,
    rank_fingerprints,
    save_adapter,
    trainable_model,
    trained_folder,
)
from prunelab.stages.recovery.plain_loop import compare_with_plain
from prunelab.stages.recovery.teacher_cache import cached_teacher
from prunelab.stages.recovery.trackers import log_step

log = get_logger(__name__)


class TrainingDiverged(RuntimeError):
    """Recovery training blew up (a NaN/Inf or exploding loss, non-finite weights): stopped before a checkpoint or
    a merge could keep the damage. A user's setting (usually the learning rate), not a bug: ``user_error``."""

    user_error = True


@dataclass
class TrainerEnv:
    """What the trainer takes from the run (not the run context, so the library is callable on its own)."""

    accelerator: Any
    tokenizer: Any
    seed: int = 0
    resume: bool = False  # continue from the newest matching checkpoint
    progress: bool = True


class Recorder:
    """Loss per optimizer step, step times, and per-rank sample indices (main process keeps them)."""

    def __init__(self, state: dict[str, Any] | None, processes: int) -> None:
        state = state or {}
        self.losses: list[float] = state.get("losses", [])
        self.samples: list[list[int]] = state.get("samples", [[] for _ in range(processes)])
        self.step_seconds: list[float] = []
        self.teacher_seconds: list[float] = []  # the teacher's share of each step (same steps as step_seconds)
        self._teacher_total = 0.0
        self.step_tokens: list[int] = []  # global input tokens per optimizer step

    def add_samples(self, gathered: torch.Tensor, processes: int) -> None:
        for rank, chunk in enumerate(gathered.view(processes, -1).tolist()):
            self.samples[rank].extend(chunk)


@dataclass
class TrainState:
    """Everything :func:`setup` builds, and where the loop is (``step``: optimizer steps done)."""

    label: str
    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    sampler: Any
    dataset: Any
    params: list[torch.nn.Parameter]
    accum: int
    steps_per_epoch: int
    total: int
    loss: Loss
    checkpoints: Checkpoints
    teacher: Teacher | None = None  # the frozen model a distillation loss compares against
    loss_settings: Any = None  # the recipe's ``loss`` group
    step: int = 0
    first_step: int = 0  # where this session started (after a resume)
    weight_scale: float | None = None  # the model's largest |weight| when training started (check_divergence)
    resumed_from: Path | None = None
    tracking: bool = False  # loop.log_with's trackers started (stages.recovery.trackers)
    recorder: Recorder = field(init=False)


def setup(env: TrainerEnv, cfg: RecoverySettings, base: torch.nn.Module, out_dir: Path, label: str,
          teacher: torch.nn.Module | None = None, plan: Any = None, generated: torch.Tensor | None = None) -> TrainState:
    """Data, trainable model, optimizer and schedule, prepared by accelerate; the teacher (if the loss needs
    one) frozen on this rank's device, its blocks paired with ``base``'s by ``plan``; resumed if asked and possible.
    ``generated``: the teacher's sequences of ``data.teacher_generate`` (:mod:`prunelab.stages.recovery.generated`)."""
    acc = env.accelerator
    loss = get_loss(cfg.loss.type)
    if loss.needs_teacher and teacher is None:
        raise ValueError(f"stages.recover: loss {loss.name!r} needs the dense teacher model and none was given")
    out_dir.mkdir(parents=True, exist_ok=True)
    accum = cfg.accumulation(acc.num_processes)
    acc.gradient_accumulation_steps = accum
    dataset = build_dataset(env.tokenizer, cfg.data, generated)
    loader, sampler = make_loader(dataset, cfg.loop.micro_batch_size, env.seed, cfg.data.shuffle, env.tokenizer.pad_token_id)
    model = trainable_model(base, cfg, out_dir, acc.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    frozen = _teacher(acc, cfg, teacher) if loss.needs_teacher else None  # after prepare: DeepSpeed's config is whole
    if frozen is not None and cfg.loss.intermediate is not None:
        frozen.pairs = block_pairs(plan, teacher.config.num_hidden_layers, base.config.num_hidden_layers)
    if frozen is not None and cfg.loss.teacher_cache:
        frozen = _cache(acc, cfg, frozen, dataset, out_dir, label, teacher.config.vocab_size)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"stages.recover: {len(dataset)} samples make no full optimizer step of {cfg.loop.batch_size}; "
                         "lower loop.batch_size or add data")
    total = cfg.loop.max_steps or max(1, math.floor(cfg.loop.epochs * steps_per_epoch))
    # Not prepared: accelerate would step it once per process; we step it once per optimizer step.
    scheduler = get_scheduler(cfg.optimizer.scheduler, optimizer, num_warmup_steps=cfg.optimizer.warmup_steps,
                              num_training_steps=total)
    ckpts = Checkpoints(acc, out_dir / "checkpoints", settings_hashes(cfg, label, acc.num_processes), cfg.checkpoint)
    run = TrainState(label, model, optimizer, scheduler, loader, sampler, dataset, params, accum, steps_per_epoch, total,
                     loss, ckpts, teacher=frozen, loss_settings=cfg.loss)
    _resume(env, run)
    run.first_step = run.step
    return run


def _teacher(acc: Any, cfg: RecoverySettings, teacher: torch.nn.Module) -> Teacher:
    """The dense model, frozen and in eval mode, in the student's compute dtype on this rank's device.

    DDP, ZeRO-1/2: every rank holds the whole teacher. ZeRO-3: the teacher is sharded for inference like the
    student, by its own DeepSpeed engine (no optimizer) made from the run's DeepSpeed config, as TRL's
    ``prepare_deepspeed`` does for its reference models."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    zero3 = acc.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3
    dtype = resolve_dtype(cfg.dtype, acc.device)
    # ZeRO-3: not moved whole onto the device first; the engine places each rank's shard there.
    model = (teacher.to(dtype=dtype) if zero3 else teacher.to(device=acc.device, dtype=dtype)).eval().requires_grad_(False)
    model.config.use_cache = False
    if zero3:
        import deepspeed  # lazy: optional

        ds = copy.deepcopy(plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            ds.pop(key, None)
        model, *_ = deepspeed.initialize(model=model, config=ds)
    frozen = Teacher(model)
    frozen.sharded = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 partitioned parameters
    return frozen


def _cache(acc: Any, cfg: RecoverySettings, live: Teacher, dataset: Any, out_dir: Path, label: str, vocab: int) -> Teacher:
    """One pass of the live teacher writes its top-k logits; its weights are then released (moved to the meta
    device) and training reads the cache."""
    meta = {"label": label, "data": cfg.data.model_dump(mode="json"), "dtype": cfg.dtype}
    cached = cached_teacher(acc, live, dataset, cfg.loss.top_k, meta, out_dir, vocab)
    cached.seconds = 0.0  # the cache is read in training; the pass is reported apart
    cached.pass_seconds = live.seconds
    if not live.sharded:
        live.model.to("meta")
    return cached


def _resume(env: TrainerEnv, run: TrainState) -> None:
    latest = run.checkpoints.latest() if env.resume else None
    state = None
    if latest is not None:
        run.resumed_from, state = latest
        run.checkpoints.load(run.resumed_from, state, run.scheduler)
        run.step = state["step"]
        log.info(f"recover ({run.label}): resuming from {run.resumed_from.name}", main_process_only=True)
    run.recorder = Recorder(state, env.accelerator.num_processes)


def loss_step(run: TrainState, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of one micro-batch (mean over it), by the loss the settings name."""
    if run.loss.needs_teacher and run.teacher is None:
        raise ValueError(f"loss {run.loss.name!r} needs a teacher model and none was given")
    return run.loss.fn(run.model, batch, run.teacher, run.loss_settings)


def _micro_step(acc: Any, run: TrainState, batch: dict[str, torch.Tensor], max_grad_norm: float | None) -> torch.Tensor:
    """Forward + backward of one micro-batch; accelerate applies the optimizer on the last of an accumulation."""
    with acc.accumulate(run.model):
        loss = loss_step(run, batch)
        acc.backward(loss)
        if acc.sync_gradients and max_grad_norm is not None:
            acc.clip_grad_norm_(run.params, max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad()
    return loss


def _optimizer_steps(acc: Any, run: TrainState, cfg: RecoverySettings, batches: Any) -> Iterator[tuple[torch.Tensor, int]]:
    """Run the micro-batches of ``batches``; after each ``accum`` of them yield (mean loss, input tokens on this rank)."""
    micro, step_loss, step_tokens = 0, 0.0, 0
    for batch in batches:
        idx = batch.pop("idx")
        if run.teacher is not None:
            run.teacher.idx = idx  # a cached teacher reads its logits by sample index
        if cfg.loop.record_samples:
            gathered = acc.gather(idx)
            if acc.is_main_process:
                run.recorder.add_samples(gathered, acc.num_processes)
        loss = _micro_step(acc, run, batch, cfg.optimizer.max_grad_norm)
        step_loss += loss.detach().float() / run.accum
        step_tokens += int(batch["attention_mask"].sum())
        micro += 1
        if micro == run.accum:
            yield step_loss, step_tokens
            micro, step_loss, step_tokens = 0, 0.0, 0


def finish_step(env: TrainerEnv, run: TrainState, cfg: RecoverySettings, loss: torch.Tensor, tokens: int, seconds: float,
                progress: Any) -> None:
    """One optimizer step is done: schedule, record (reduced over ranks), log, checkpoint when due."""
    acc, rec = env.accelerator, run.recorder
    run.scheduler.step()
    run.step += 1
    rec.losses.append(acc.reduce(loss.reshape(1), reduction="mean").item())
    rec.step_tokens.append(int(acc.reduce(torch.tensor([tokens], device=acc.device), reduction="sum").item()))
    rec.step_seconds.append(seconds)
    if run.teacher is not None:  # per step, so the student's time is a difference of the same step's two clocks
        rec.teacher_seconds.append(max(0.0, run.teacher.seconds - rec._teacher_total))
        rec._teacher_total = run.teacher.seconds
    check_divergence(acc, run, cfg)
    progress.update(1)
    progress.set_postfix(loss=f"{rec.losses[-1]:.4f}")
    if run.tracking:
        log_step(acc, run.step, rec.losses[-1], run.scheduler.get_last_lr()[0], rec.step_tokens[-1])
    if run.step % cfg.loop.log_every == 0 or run.step == run.total:
        log.info(f"recover ({run.label}) step {run.step}/{run.total} loss {rec.losses[-1]:.4f}", main_process_only=True)
    if run.checkpoints.due(run.step, run.total):
        run.checkpoints.save(run.step, run.scheduler, rec.losses, rec.samples)


def check_divergence(acc: Any, run: TrainState, cfg: RecoverySettings) -> None:
    """Raise :class:`TrainingDiverged` when the step just recorded is not finite or has exploded: its loss above
    ``divergence_factor`` × the first loss after warm-up, or a trained weight NaN/Inf (checked at log and checkpoint
    steps: one pass over the trained tensors). The loss is the ranks' reduced mean and the weight flag is summed
    over ranks, so every rank stops at the same step (none is left waiting in a collective)."""
    rec, step = run.recorder, run.step
    loss = rec.losses[-1]
    warm = min(cfg.optimizer.warmup_steps, len(rec.losses) - 1)  # the first loss after warm-up (or the last one yet)
    reference = rec.losses[warm]
    fix = (f"lower the recover stage's optimizer.lr (now {cfg.optimizer.lr:g}), add optimizer.warmup_steps or keep "
           "optimizer.max_grad_norm on; the pruned model is kept (--resume re-runs only recovery and what follows)")
    if not math.isfinite(loss):
        raise TrainingDiverged(f"recovery ({run.label}) diverged: the loss at step {step} is {loss}; {fix}")
    factor = cfg.loop.divergence_factor
    if factor is not None and len(rec.losses) > warm + 1 and math.isfinite(reference) and loss > factor * reference:
        raise TrainingDiverged(f"recovery ({run.label}) diverged: the loss at step {step} is {loss:.4g}, above "
                               f"{factor:g} × {reference:.4g} (the first loss after warm-up; loop.divergence_factor); {fix}")
    if step % cfg.loop.log_every == 0 or step == run.total or run.checkpoints.due(step, run.total):
        peak = _peak(acc, run.params)
        if not math.isfinite(peak):
            raise TrainingDiverged(f"recovery ({run.label}) diverged: a trained tensor holds NaN/Inf at step {step}; {fix}")
        if run.weight_scale and peak > WEIGHT_BLOWUP * run.weight_scale:
            raise TrainingDiverged(f"recovery ({run.label}) diverged: a trained weight reached {peak:.3g} at step {step}, "
                                   f"over {WEIGHT_BLOWUP:g} × the largest weight of the model before training "
                                   f"({run.weight_scale:.3g}); {fix}")


WEIGHT_BLOWUP = 100.0  # trained weights this many times the model's largest weight: no learning rate meant that


def _peak(acc: Any, params: Any) -> float:
    """The largest |value| over ``params`` on every rank (NaN/Inf if any is): the same answer on all of them."""
    with torch.no_grad():
        local = torch.zeros(1, device=acc.device)
        for p in params:
            if p.numel():  # a ZeRO-3 placeholder holds nothing on this rank
                local = torch.maximum(local, p.detach().abs().max().float().reshape(1).to(acc.device))  # NaN propagates
        return float(acc.gather(local).max().item())


def train(env: TrainerEnv, run: TrainState, cfg: RecoverySettings) -> float:
    """Optimizer steps from ``run.step`` to ``run.total``, epoch by epoch; returns the seconds it took."""
    acc = env.accelerator
    run.model.train()
    progress = tqdm(total=run.total, initial=run.step, desc=f"recover ({run.label})", disable=not env.progress,
                    dynamic_ncols=True)
    run.weight_scale = _peak(acc, run.model.parameters())  # the divergence guard's yardstick (check_divergence)
    t_train = time.perf_counter()
    with run.checkpoints.adapter_only():
        while run.step < run.total:
            epoch, done_in_epoch = divmod(run.step, run.steps_per_epoch)
            run.sampler.set_epoch(epoch)
            batches = acc.skip_first_batches(run.loader, done_in_epoch * run.accum) if done_in_epoch else run.loader
            t_step = time.perf_counter()
            for loss, tokens in _optimizer_steps(acc, run, cfg, batches):
                finish_step(env, run, cfg, loss, tokens, time.perf_counter() - t_step, progress)
                t_step = time.perf_counter()
                if run.step >= run.total or run.step % run.steps_per_epoch == 0:
                    break
    seconds = time.perf_counter() - t_train
    progress.close()
    return seconds


def save(env: TrainerEnv, run: TrainState, cfg: RecoverySettings, out_dir: Path, seconds: float) -> dict[str, Any]:
    """Adapter (gathered from every shard), loss curve and samples; returns the training's summary."""
    acc, rec = env.accelerator, run.recorder
    fingerprints = rank_fingerprints(acc, run.model)
    save_adapter(acc, run.model, out_dir / trained_folder(cfg.method))
    info = _summary(run, acc.num_processes, seconds)
    if acc.is_main_process:
        atomic_write_json(out_dir / "loss.json", {"label": run.label, "steps": list(range(1, len(rec.losses) + 1)),
                                                  "loss": rec.losses})
        if cfg.loop.record_samples:
            atomic_write_json(out_dir / "samples.json", {"processes": acc.num_processes, "dataset_size": len(run.dataset),
                                                          "per_rank": rec.samples, "adapter_fingerprint_per_rank": fingerprints})
    acc.free_memory(run.model, run.optimizer)
    run.model = run.optimizer = None
    return info


def recover_model(env: TrainerEnv, cfg: RecoverySettings, base: torch.nn.Module, out_dir: Path, label: str,
                  teacher: torch.nn.Module | None = None, plan: Any = None,
                  generated: torch.Tensor | None = None) -> dict[str, Any]:
    """Train ``base`` (an adapter on it, or every weight for ``full``); write the trained tensors, loss curve,
    samples; return stats and the merged model. ``teacher``: the dense model, for a distillation loss;
    ``plan``: the pruning plan that made ``base`` from it (the block mapping of ``loss.intermediate``)."""
    run = setup(env, cfg, base, out_dir, label, teacher, plan, generated)
    run.tracking = trackers.start(env.accelerator, cfg.loop.log_with, f"prunelab-{label}",
                                  {"method": cfg.method, "steps": run.total, "batch_size": cfg.loop.batch_size,
                                   "lr": cfg.optimizer.lr, "loss": run.loss.name}, out_dir / "trackers")
    try:
        seconds = train(env, run, cfg)
    finally:
        if run.tracking:
            trackers.finish(env.accelerator)
    info = save(env, run, cfg, out_dir, seconds)
    run.teacher = None
    compare_with_plain(info, base, cfg, run.dataset, run.accum, env.seed, env.accelerator)
    info["model"] = apply_trained(base, out_dir / trained_folder(cfg.method), cfg.method)
    return info


def _summary(run: TrainState, processes: int, seconds: float) -> dict[str, Any]:
    """Throughput = median tokens per step / median step time, warm-up step excluded."""
    rec = run.recorder
    timed = rec.step_seconds[1:] or rec.step_seconds  # the first step includes warm-up
    median = statistics.median(timed) if timed else float("nan")
    tokens_per_step = int(statistics.median(rec.step_tokens)) if rec.step_tokens else 0
    extra: dict[str, Any] = {"loss": run.loss.name}
    if run.teacher is not None and run.step > run.first_step:
        # The teacher's forwards are timed inside each step; without them that step takes (step − teacher) seconds.
        # Both medians are over the same steps' own differences (never a median minus a mean, which can go ≤ 0
        # under load); a step is at least as long as the teacher's part of it, so the difference is never negative.
        teacher_s = run.teacher.seconds / (run.step - run.first_step)
        pairs = list(zip(rec.step_seconds, rec.teacher_seconds))
        pairs = pairs[1:] or pairs  # the same warm-up step excluded
        student_s = statistics.median(max(s - t, 1e-9) for s, t in pairs) if pairs else float("nan")
        extra["teacher"] = {"sharded": run.teacher.sharded, "cached": hasattr(run.teacher, "pass_seconds"),
                            "cache_pass_s": round(getattr(run.teacher, "pass_seconds", 0.0), 3),
                            "s_per_step": round(teacher_s, 4), "share_of_step": round(teacher_s / median, 3) if timed else None,
                            "tokens_per_s_without_teacher": round(tokens_per_step / student_s, 1) if pairs else None}
    return {
        **extra, "label": run.label, "steps": run.total, "accumulation": run.accum, "processes": processes,
        "tokens_per_step": tokens_per_step, "seconds": round(seconds, 2),
        "median_step_s": round(median, 4), "tokens_per_s": round(tokens_per_step / median, 1) if timed else None,
        "first_loss": rec.losses[0] if rec.losses else None, "final_loss": rec.losses[-1] if rec.losses else None,
        "resumed_from": run.resumed_from.name if run.resumed_from else None, "peak_memory_mb": peak_memory_mb(),
    }
