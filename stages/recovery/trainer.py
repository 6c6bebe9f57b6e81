"""LoRA / QLoRA training under accelerate (one process, DDP or DeepSpeed) and the full-precision merge.

Why this shape:
- The GLOBAL batch is fixed by the recipe; gradient accumulation = batch / (micro × processes), so one
  process and two processes see the same samples per optimizer step and reach the same weights.
- The sample order is a seeded permutation shared by every rank; accelerate shards it by batches.
  Each rank's consumed indices are gathered to the main process and written out as proof.
- Checkpoints (``accelerator.save_state``) hold only the trainable (adapter) weights plus optimizer,
  scheduler and RNG states; ``--resume`` loads the newest and skips the batches already consumed
  (``skip_first_batches``), so the resumed run ends with the same loss as an uninterrupted one.
- Merging always goes through peft onto the caller's full-precision model: for QLoRA that is the
  unquantized pruned weights, never the dequantized NF4 ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger

from stages.core.files import atomic_write_json

log = get_logger(__name__)
TRAIN_STATE = "trainer_state.json"
FAIL_AT_STEP_ENV = "PRUNELAB_FAIL_AT_STEP"  # tests: crash after this optimizer step (simulates a killed job)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, identical on every rank (accelerate shards the batches)."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        from stages.recovery.data import epoch_order

        return iter(epoch_order(self.n, self.seed, self.epoch, self.shuffle))

    def __len__(self) -> int:
        return self.n


def build_dataset(ctx: Any, cfg: Any) -> Any:
    from stages.io.text import read_text, tokenize_text
    from stages.recovery.data import alpaca_examples, packed_text, read_rows

    d = cfg.data
    if d.format == "text":
        return packed_text(tokenize_text(ctx.tokenizer, read_text(d.source)), d.seq_len, d.max_samples)
    return alpaca_examples(read_rows(d.source), ctx.tokenizer, d.seq_len, d.train_on_inputs, d.max_samples)


def lora_config(cfg: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      bias="none", task_type="CAUSAL_LM")


def trainable_model(base: torch.nn.Module, cfg: Any, work_dir: Path | None, device: torch.device) -> torch.nn.Module:
    """A peft model to train. LoRA: a copy of ``base`` (the caller's weights stay untouched for the
    merge). QLoRA: ``base`` saved once and re-loaded with its linears in NF4 (bitsandbytes)."""
    from peft import get_peft_model

    from stages.io.models import resolve_dtype

    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.method == "lora":
        model = copy.deepcopy(base).to(device=device, dtype=dtype)
    else:
        if work_dir is None:
            raise ValueError("QLoRA needs a folder for the full-precision copy it quantizes")
        model = _load_nf4(base, work_dir / "base-fp", dtype, device)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(cfg))


def _load_nf4(base: torch.nn.Module, folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from stages.core.files import atomic_dir

    if not (folder / "config.json").is_file():
        with atomic_dir(folder) as tmp:
            base.save_pretrained(tmp)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # = model dtype: needed for ZeRO-3 to shard the packed NF4 weights (peft's guide)
    )
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype, device_map={"": device})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def merge_adapter(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Fold the saved adapter into ``base`` (full precision) with peft and return a plain model."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.eval()
    return merged


def _config_hash(cfg: Any, label: str, processes: int) -> str:
    return hashlib.sha256(f"{cfg.model_dump_json()}|{label}|{processes}".encode()).hexdigest()[:16]


def _latest_checkpoint(folder: Path, config_hash: str) -> tuple[Path, dict[str, Any]] | None:
    found = []
    for ckpt in folder.glob("step-*"):
        state_file = ckpt / TRAIN_STATE
        if ckpt.is_dir() and state_file.is_file():
            state = json.loads(state_file.read_text())
            if state.get("config_hash") == config_hash:
                found.append((state["step"], ckpt, state))
    if not found:
        return None
    _, ckpt, state = max(found, key=lambda t: t[0])
    return ckpt, state


def _trainable_only(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


class Recorder:
    """Loss per optimizer step, step times, and per-rank sample indices (main process keeps them)."""

    def __init__(self, state: dict[str, Any] | None, processes: int) -> None:
        state = state or {}
        self.losses: list[float] = state.get("losses", [])
        self.samples: list[list[int]] = state.get("samples", [[] for _ in range(processes)])
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []  # global input tokens per optimizer step

    def add_samples(self, gathered: torch.Tensor, processes: int) -> None:
        for rank, chunk in enumerate(gathered.view(processes, -1).tolist()):
            self.samples[rank].extend(chunk)


def recover_model(ctx: Any, cfg: Any, base: torch.nn.Module, out_dir: Path, label: str) -> dict[str, Any]:
    """Train LoRA on ``base``; write adapter, loss curve, samples; return stats and the merged model."""
    from transformers import get_scheduler

    acc = ctx.accelerator
    out_dir.mkdir(parents=True, exist_ok=True)
    accum = cfg.accumulation(acc.num_processes)
    acc.gradient_accumulation_steps = accum
    dataset = build_dataset(ctx, cfg)
    from stages.recovery.data import collate

    sampler = EpochSampler(len(dataset), ctx.recipe.seed, cfg.data.shuffle)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch_size, sampler=sampler,
                                         collate_fn=collate(ctx.tokenizer.pad_token_id), drop_last=True)
    model = trainable_model(base, cfg, out_dir, acc.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"stages.recover: {len(dataset)} samples make no full optimizer step of {cfg.batch_size}; "
                         "lower batch_size or add data")
    total = cfg.max_steps or max(1, math.floor(cfg.epochs * steps_per_epoch))
    # Not prepared: accelerate would step it once per process; we step it once per optimizer step.
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    ckpt_dir = out_dir / "checkpoints"
    chash = _config_hash(cfg, label, acc.num_processes)
    hook = acc.register_save_state_pre_hook(lambda models, weights, _dir: weights.__setitem__(
        slice(None), [_trainable_only(acc.unwrap_model(m)) for m in models]))
    step, resumed_from, state = 0, None, None
    latest = _latest_checkpoint(ckpt_dir, chash) if ctx.resume else None
    if latest is not None:
        resumed_from, state = latest
        acc.load_state(str(resumed_from), **_load_kwargs(acc))
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        log.info(f"recover ({label}): resuming from {resumed_from.name}", main_process_only=True)
    rec = Recorder(state, acc.num_processes)
    model.train()
    progress = _progress(ctx, total, step, label)
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
    t_train = time.perf_counter()
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        batches = acc.skip_first_batches(loader, done_in_epoch * accum) if done_in_epoch else loader
        micro, step_loss, step_tokens, t_step = 0, 0.0, 0, time.perf_counter()
        for batch in batches:
            idx = batch.pop("idx")
            if cfg.record_samples:
                gathered = acc.gather(idx)
                if acc.is_main_process:
                    rec.add_samples(gathered, acc.num_processes)
            with acc.accumulate(model):
                loss = model(**batch).loss
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm is not None:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            step_loss += loss.detach().float() / accum
            step_tokens += int(batch["attention_mask"].sum())
            micro += 1
            if micro < accum:
                continue
            scheduler.step()
            step += 1
            rec.losses.append(acc.reduce(step_loss.reshape(1), reduction="mean").item())
            rec.step_tokens.append(int(acc.reduce(torch.tensor([step_tokens], device=acc.device), reduction="sum").item()))
            rec.step_seconds.append(time.perf_counter() - t_step)
            progress.update(1)
            progress.set_postfix(loss=f"{rec.losses[-1]:.4f}")
            if step % cfg.log_every == 0 or step == total:
                log.info(f"recover ({label}) step {step}/{total} loss {rec.losses[-1]:.4f}", main_process_only=True)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                _save_checkpoint(acc, ckpt_dir, step, chash, scheduler, rec, cfg.keep_checkpoints)
            if fail_at and step == fail_at:
                raise RuntimeError(f"{FAIL_AT_STEP_ENV}={fail_at}: simulated crash after step {step}")
            micro, step_loss, step_tokens, t_step = 0, 0.0, 0, time.perf_counter()
            if step >= total or step % steps_per_epoch == 0:
                break
    train_seconds = time.perf_counter() - t_train
    progress.close()
    hook.remove()
    adapter_dir = out_dir / "adapter"
    fingerprints = _rank_fingerprints(acc, model)
    _save_adapter(acc, model, adapter_dir)
    info = _summary(rec, label, total, accum, acc.num_processes, train_seconds, resumed_from)
    if acc.is_main_process:
        atomic_write_json(out_dir / "loss.json", {"label": label, "steps": list(range(1, len(rec.losses) + 1)), "loss": rec.losses})
        if cfg.record_samples:
            atomic_write_json(out_dir / "samples.json", {"processes": acc.num_processes, "dataset_size": len(dataset),
                                                          "per_rank": rec.samples, "adapter_fingerprint_per_rank": fingerprints})
    acc.free_memory(model, optimizer)
    del model, optimizer
    if cfg.compare_plain_steps and acc.num_processes == 1:
        plain = plain_peft_step_seconds(base, cfg, dataset, accum, cfg.compare_plain_steps, ctx.recipe.seed, acc.device)
        info["plain_peft"] = plain
        info["tokens_per_s_ratio_vs_plain"] = round(info["tokens_per_s"] / plain["tokens_per_s"], 3)
    info["model"] = merge_adapter(base, adapter_dir)
    return info


def plain_peft_step_seconds(base: torch.nn.Module, cfg: Any, dataset: Any, accum: int, steps: int, seed: int,
                            device: torch.device) -> dict[str, Any]:
    """The baseline our loop must match: peft + torch AdamW + a bare loop over the same micro-batches
    (same order, same accumulation), one process, no accelerate. Median step time, warm-up excluded."""
    from stages.recovery.data import collate, epoch_order

    if cfg.method != "lora":
        return {"skipped": "plain loop timed for method lora only"}
    model = trainable_model(base, cfg, None, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = epoch_order(len(dataset), seed, 0, cfg.data.shuffle)
    fn = collate(0)
    mb = cfg.micro_batch_size
    model.train()
    times, tokens = [], []
    for step in range(steps + 1):
        t0, n = time.perf_counter(), 0
        for m in range(accum):
            start = ((step * accum + m) * mb) % max(1, len(order) - mb + 1)
            batch = fn([dataset[i] for i in order[start:start + mb]])
            batch.pop("idx")
            batch = {k: v.to(device) for k, v in batch.items()}
            (model(**batch).loss / accum).backward()
            n += int(batch["attention_mask"].sum())
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        tokens.append(n)
    median = statistics.median(times[1:])
    del model, opt
    return {"steps": steps, "median_step_s": round(median, 4), "tokens_per_s": round(statistics.median(tokens[1:]) / median, 1)}


def _load_kwargs(acc: Any) -> dict[str, Any]:
    """Checkpoints hold only the adapter: tell the loader the frozen base weights are absent on purpose."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        return {"load_module_strict": False}
    return {"strict": False}


def _save_checkpoint(acc: Any, ckpt_dir: Path, step: int, chash: str, scheduler: Any, rec: Recorder, keep: int) -> None:
    """save_state into ``step-N.tmp`` then rename, so a kill mid-save never leaves a checkpoint that looks whole."""
    from accelerate.utils import DistributedType

    final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f"step-{step}.tmp"
    kwargs = {"exclude_frozen_parameters": True} if acc.distributed_type == DistributedType.DEEPSPEED else {}
    tmp.mkdir(parents=True, exist_ok=True)  # every rank writes its RNG state (and ZeRO shards) here
    acc.save_state(str(tmp), **kwargs)
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(tmp / TRAIN_STATE, {"step": step, "config_hash": chash, "scheduler": scheduler.state_dict(),
                                              "losses": rec.losses, "samples": rec.samples})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        old = sorted((p for p in ckpt_dir.glob("step-*") if p.suffix != ".tmp"), key=lambda p: int(p.name.split("-")[1]))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()


def _rank_fingerprints(acc: Any, model: Any) -> list[list[float]]:
    """Each rank's adapter as (Σw, Σ|w|, Σw²) in float64, gathered: DDP/ZeRO replicas must agree.
    (Under ZeRO-3 a rank holds a shard, so its numbers describe its shard, not the whole adapter.)"""
    named = [p for _, p in acc.unwrap_model(model).named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().double().flatten() for p in named]) if named else torch.zeros(1, dtype=torch.float64)
    local = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()]).to(acc.device)
    return acc.gather(local.reshape(1, 3)).tolist()


def _save_adapter(acc: Any, model: Any, adapter_dir: Path) -> None:
    """Adapter weights gathered from every shard, written by the main process only.

    Only the trainable tensors are gathered (``GatheredParameters`` under ZeRO-3), so this needs no
    ``stage3_gather_16bit_weights_on_model_save`` and never materialises the frozen base twice.
    """
    from contextlib import nullcontext

    from stages.core.files import atomic_dir

    unwrapped = acc.unwrap_model(model)
    named = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    gather = nullcontext()
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3 partitioned parameters
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        state = {n: p.detach().to("cpu", copy=True) for n, p in named}
    if acc.is_main_process:
        with atomic_dir(adapter_dir) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state)
    acc.wait_for_everyone()


def _summary(rec: Recorder, label: str, total: int, accum: int, processes: int, seconds: float,
             resumed_from: Path | None) -> dict[str, Any]:
    """Throughput = median tokens per step / median step time, warm-up step excluded."""
    from stages.evaluation.memory import peak_memory_mb

    timed = rec.step_seconds[1:] or rec.step_seconds  # the first step includes warm-up
    median = statistics.median(timed) if timed else float("nan")
    tokens_per_step = int(statistics.median(rec.step_tokens)) if rec.step_tokens else 0
    return {
        "label": label, "steps": total, "accumulation": accum, "processes": processes,
        "tokens_per_step": tokens_per_step, "seconds": round(seconds, 2),
        "median_step_s": round(median, 4), "tokens_per_s": round(tokens_per_step / median, 1) if timed else None,
        "first_loss": rec.losses[0] if rec.losses else None, "final_loss": rec.losses[-1] if rec.losses else None,
        "resumed_from": resumed_from.name if resumed_from else None, "peak_memory_mb": peak_memory_mb(),
    }


def _progress(ctx: Any, total: int, start: int, label: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"recover ({label})", disable=not ctx.progress, dynamic_ncols=True)
