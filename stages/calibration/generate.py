"""Self-generated calibration text: seeded sampling from the dense model, cached shard by shard.

See ``prunelab.stages.calibration.sources`` for the method (Williams et al., NAACL 2025, arXiv 2410.17170).
Each batch draws from its own generator seeded by (seed, batch index), so a resumed run produces the
same tokens as an uninterrupted one; a shard is trusted only if its recorded settings match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelab.stages.calibration.sources import SelfGeneratedSettings, SelfGeneratedSource
from prunelab.stages.io.text import sample_windows, tokenized_source

log = logging.getLogger(__name__)


def _prompts(tokenizer: Any, s: SelfGeneratedSettings, n: int, seed: int) -> torch.Tensor:
    if s.prompt == "bos":
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise ValueError("self_generated: the tokenizer has neither a BOS nor an EOS token; give prompt: a text source")
        return torch.full((n, 1), bos, dtype=torch.long)
    return sample_windows(tokenized_source(tokenizer, s.prompt), n, s.prompt_tokens, seed)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside top-k and the top-p nucleus set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(model: Any, prompt: torch.Tensor, length: int, s: SelfGeneratedSettings, gen: torch.Generator) -> torch.Tensor:
    """Continue ``prompt`` [B, P] to ``length`` tokens with the KV cache, temperature moving linearly."""
    device = next(model.parameters()).device
    ids = prompt.to(device)
    out = model(input_ids=ids, use_cache=True)
    steps = length - prompt.shape[1]
    for t in range(steps):
        end = s.temperature if s.temperature_end is None else s.temperature_end
        temp = s.temperature + (end - s.temperature) * (t / max(steps - 1, 1))
        logits = _filter(out.logits[:, -1].float().cpu() / temp, s.top_k, s.top_p)
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        ids = torch.cat([ids, nxt.to(device)], dim=1)
        if t + 1 < steps:
            out = model(input_ids=nxt.to(device), cache=out.cache, use_cache=True)
    return ids.cpu()


def _key(s: SelfGeneratedSettings, seed: int, seq_len: int, batch: int, rows: int) -> str:
    blob = json.dumps([s.model_dump(mode="json"), seed, seq_len, batch, rows], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def self_generate(model: Any, tokenizer: Any, s: SelfGeneratedSettings, n: int, seq_len: int, seed: int,
                  cache_dir: Path, progress: bool = True) -> torch.Tensor:
    """[n, seq_len] tokens sampled by ``model``; finished batches are read back from ``cache_dir``."""
    prompts = _prompts(tokenizer, s, n, seed)
    if prompts.shape[1] >= seq_len:
        raise ValueError(f"self_generated: prompt_tokens {prompts.shape[1]} leaves nothing to generate at seq_len {seq_len}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    shards = []
    starts = range(0, n, s.batch_size)
    t0, reused = time.perf_counter(), 0
    # a log line, not only the bar: with --no-progress (the benches) this can be half an hour of silence otherwise
    log.info("self-generating %d × %d tokens in %d batches (cached in %s)", n, seq_len, len(starts), cache_dir)
    for b, start in enumerate(tqdm(starts, desc="self-generating calibration", disable=not progress)):
        rows = prompts[start : start + s.batch_size]
        key = _key(s, seed, seq_len, b, rows.shape[0])
        path = cache_dir / f"shard-{b:04d}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved.get("key") == key:
                shards.append(saved["ids"])
                reused += 1
                continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b)
        ids = sample(model, rows, seq_len, s, gen)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save({"key": key, "ids": ids}, tmp)
        tmp.replace(path)
        shards.append(ids)
    model.train(was_training)
    log.info("self-generated %d × %d tokens in %.1f s (%d of %d batches read back from the cache)",
             n, seq_len, time.perf_counter() - t0, reused, len(starts))
    return torch.cat(shards)


def generated_windows(source: SelfGeneratedSource, model: Any, tokenizer: Any, num_samples: int, seq_len: int,
                      seed: int, cache_dir: Path, progress: bool = True) -> torch.Tensor:
    """The registered ``self_generated`` source's windows (``prunelab.stages.calibration.sources``)."""
    return self_generate(model, tokenizer, source.self_generated, num_samples, seq_len, seed, cache_dir, progress)
