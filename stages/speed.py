"""Inference speed and memory of the model as it is: prefill latency, decode tokens/s, peak memory.

Medians of repeats after a warm-up, so one-off costs (allocations, kernel selection) are excluded.
Decode throughput = generated tokens / (generate time − prefill time) with a KV cache, greedy,
a fixed number of new tokens (``min_new_tokens`` = ``max_new_tokens``) so every model does equal work.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model: Any, prompt_len: int = 128, new_tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 8),
                  repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Return {"prefill_ms": {bs: ms}, "decode_tok_s": {bs: tok/s}, "peak_memory_mb": ..., "protocol": ...}."""
    from pipeline.metrics import PeakRSS

    model.eval()
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"prefill_ms": {}, "decode_tok_s": {}}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as rss:
        for bs in batch_sizes:
            ids = torch.randint(3, vocab, (bs, prompt_len), generator=gen).to(device)
            prefill, total = [], []
            for i in range(warmup + repeats):
                _sync(device)
                t0 = time.perf_counter()
                model(ids, use_cache=True)
                _sync(device)
                t1 = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, use_cache=True, pad_token_id=0)
                _sync(device)
                t2 = time.perf_counter()
                if i >= warmup:
                    prefill.append(t1 - t0)
                    total.append(t2 - t1)
            p, g = statistics.median(prefill), statistics.median(total)
            out["prefill_ms"][str(bs)] = round(p * 1000, 2)
            # generate() runs its own prefill and new_tokens-1 decode steps after it
            out["decode_tok_s"][str(bs)] = round(bs * (new_tokens - 1) / max(g - p, 1e-9), 1)
    out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else round(rss.peak_mb, 1)
    out["memory_kind"] = "cuda max allocated" if device.type == "cuda" else "process RSS"
    out["protocol"] = (f"{device.type}, {str(next(model.parameters()).dtype).removeprefix('torch.')}, prompt {prompt_len} tokens, "
                       f"{new_tokens} new tokens greedy with KV cache, batch sizes {list(batch_sizes)}, "
                       f"median of {repeats} after {warmup} warm-up")
    return out
