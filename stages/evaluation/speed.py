"""Inference speed and memory of the model as it is: prefill latency, decode tokens/s, peak memory.

Medians of repeats after a warm-up, so one-off costs (allocations, kernel selection) are excluded.
Decode throughput = batch × (new_tokens − 1) / the time of that many greedy single-token steps with the KV
cache after the prefill — a fixed number of steps (no early stop) so every model does equal work.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from prunelab.stages.core.compat import cache_kwargs, output_cache
from prunelab.stages.evaluation.memory import PeakRSS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_decode(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s) of one greedy generation with the KV cache, each timed on its own.

    The decode loop is ours (one single-token forward per step, argmax), not ``generate()``: timing it directly
    avoids "generate time − a separate prefill", a difference of two noisy numbers that a stall during the
    prefill can drive to zero or below."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    _sync(device)
    t1 = time.perf_counter()
    past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens - 1):
        out = model(token, **cache_kwargs(type(model).forward, past), use_cache=True)
        past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def measure_speed(model: Any, prompt_len: int = 128, new_tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 8),
                  repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Return {"prefill_ms": {bs: ms}, "decode_tok_s": {bs: tok/s}, "peak_memory_mb": ..., "protocol": ...}."""
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
            runs = [_timed_decode(model, ids, new_tokens) for _ in range(warmup + repeats)][warmup:]
            p, d = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            out["prefill_ms"][str(bs)] = round(p * 1000, 2)
            out["decode_tok_s"][str(bs)] = round(bs * (new_tokens - 1) / d, 1)
    out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else round(rss.peak_mb, 1)
    out["memory_kind"] = "cuda max allocated" if device.type == "cuda" else "process RSS"
    out["protocol"] = (f"{device.type}, {str(next(model.parameters()).dtype).removeprefix('torch.')}, prompt {prompt_len} tokens, "
                       f"{new_tokens} new tokens greedy with KV cache (prefill, then {new_tokens - 1} timed single-token steps), batch sizes {list(batch_sizes)}, "
                       f"median of {repeats} after {warmup} warm-up")
    return out


@torch.no_grad()
def measure_speedup(model: Any, reference: Any, prompt_len: int = 128, new_tokens: int = 32,
                    batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Decode speedup of ``model`` over ``reference`` from interleaved, paired runs.

    Why paired: on a shared CPU the machine's speed drifts by tens of percent over a long benchmark, so tokens/s
    measured minutes apart do not divide into a trustworthy ratio. Here each repeat times both models back to back
    on the same prompt (order alternating A-B, B-A), takes the ratio reference/model of their decode times, and
    reports the median ratio — drift slower than one pair cancels."""
    model.eval()
    reference.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"decode_speedup": {}, "pair_ratios": {}}
    for bs in batch_sizes:
        ids = torch.randint(3, model.config.vocab_size, (bs, prompt_len), generator=gen).to(device)
        for _ in range(warmup):
            _timed_decode(model, ids, new_tokens)
            _timed_decode(reference, ids, new_tokens)
        ratios = []
        for r in range(repeats):
            first, second = (model, reference) if r % 2 == 0 else (reference, model)
            a, b = _timed_decode(first, ids, new_tokens)[1], _timed_decode(second, ids, new_tokens)[1]
            t_model, t_ref = (a, b) if first is model else (b, a)
            ratios.append(t_ref / t_model)
        out["decode_speedup"][str(bs)] = round(statistics.median(ratios), 3)
        out["pair_ratios"][str(bs)] = [round(x, 3) for x in ratios]
    out["protocol"] = (f"{device.type}, paired with the dense model: {repeats} interleaved pairs (A-B, B-A) after {warmup} "
                       f"warm-up, median of decode-time ratios; prompt {prompt_len}, {new_tokens} new tokens greedy, "
                       f"batch sizes {list(batch_sizes)}")
    return out
