"""The speed baseline our trainer must match: peft + torch AdamW + a bare loop, one process, no accelerate.

``compare_plain_steps: N`` times N steps of it on the same micro-batches (same order, same accumulation)
after the real training, in the same process, and reports tokens/s beside the trainer's.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from prunelab.stages.recovery.config import RecoverySettings
from prunelab.stages.recovery.data import collate, epoch_order
from prunelab.stages.recovery.model import trainable_model


def compare_with_plain(info: dict[str, Any], base: torch.nn.Module, cfg: RecoverySettings, dataset: Any, accum: int,
                       seed: int, acc: Any) -> None:
    """Add ``plain_peft`` and ``tokens_per_s_ratio_vs_plain`` to a training's ``info`` (one process only)."""
    if not cfg.compare_plain_steps or acc.num_processes != 1:
        return
    plain = plain_peft_step_seconds(base, cfg, dataset, accum, cfg.compare_plain_steps, seed, acc.device)
    info["plain_peft"] = plain
    if "tokens_per_s" in plain and info.get("tokens_per_s"):
        info["tokens_per_s_ratio_vs_plain"] = round(info["tokens_per_s"] / plain["tokens_per_s"], 3)


def plain_peft_step_seconds(base: torch.nn.Module, cfg: RecoverySettings, dataset: Any, accum: int, steps: int, seed: int,
                            device: torch.device) -> dict[str, Any]:
    """Median step time of the bare loop (next-token loss), warm-up step excluded."""
    if cfg.method != "lora":
        return {"skipped": "plain loop timed for method lora only"}
    model = trainable_model(base, cfg, None, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    order = epoch_order(len(dataset), seed, 0, cfg.data.shuffle)
    fn = collate(0)
    mb = cfg.loop.micro_batch_size
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
        if cfg.optimizer.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.max_grad_norm)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        tokens.append(n)
    median = statistics.median(times[1:])
    del model, opt
    return {"steps": steps, "median_step_s": round(median, 4), "tokens_per_s": round(statistics.median(tokens[1:]) / median, 1)}
