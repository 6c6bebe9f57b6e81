"""Recovery text written by the dense teacher (``data.teacher_generate``): seeded continuations of prompts drawn
from the data's own source, cached shard by shard.

The sampling and the shard cache are those of self-generated calibration (``prunelab.stages.calibration.generate``):
each batch draws from a generator seeded by (seed, batch index) and is written to ``cache_dir`` as it finishes,
with a key of every setting it depends on, so a resumed run reads finished shards back and a changed setting
makes them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunelab.stages.calibration.generate import self_generate
from prunelab.stages.calibration.sources import SamplingSettings, SelfGeneratedSettings
from prunelab.stages.recovery.config import RecoveryData


def teacher_text(data: RecoveryData, model: Any, tokenizer: Any, seed: int, cache_dir: Path,
                 progress: bool = True) -> torch.Tensor:
    """LongTensor [num_samples, seq_len]: prompts of ``prompt_tokens`` tokens from ``data.source``, continued by
    ``model`` to ``data.seq_len`` tokens."""
    g = data.teacher_generate
    if g is None:
        raise ValueError("data.teacher_generate is not set")
    sampling = {k: getattr(g, k) for k in SamplingSettings.model_fields}
    settings = SelfGeneratedSettings(prompt=data.source, prompt_tokens=g.prompt_tokens, **sampling)
    return self_generate(model, tokenizer, settings, g.num_samples, data.seq_len, seed, cache_dir, progress)


def generate_once(accelerator: Any, data: RecoveryData, model: Any, tokenizer: Any, seed: int, cache_dir: Path,
                  progress: bool = True) -> torch.Tensor:
    """:func:`teacher_text` on the main process first (it writes the shards), then on the others (they read them)."""
    if accelerator is None:
        return teacher_text(data, model, tokenizer, seed, cache_dir, progress)
    with accelerator.main_process_first():
        return teacher_text(data, model, tokenizer, seed, cache_dir, progress and accelerator.is_main_process)
