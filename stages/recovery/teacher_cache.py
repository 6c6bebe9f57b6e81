"""``loss.teacher_cache``: the teacher's top-k logits at every position of every training sample, written to disk
in one pass before training and read back for each micro-batch, so the teacher is freed before the first step.

Files in ``<stage>/teacher-cache/`` (written whole, then renamed): ``values.npy`` float32 (samples, seq_len, k),
``indices.npy`` int32 (same shape), ``lengths.npy`` int64 (samples,), ``meta.json`` (what the cache was made
from; a cache whose meta differs is made again). Size: samples × seq_len × k × 8 bytes.

Reading back gives logits of -inf except at the cached top-k indices, so :func:`kd_divergence` with the same
``top_k`` computes exactly what it computes from the live teacher (the top-k set and its values are the same).
Every rank runs the pass (under ZeRO-3 the sharded teacher needs all ranks in each forward); the main process
writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from prunelab.stages.core.files import atomic_dir
from prunelab.stages.recovery.losses import Teacher

FOLDER = "teacher-cache"


class CachedTeacher(Teacher):
    """A :class:`Teacher` whose logits come from the cache; ``idx`` (the micro-batch's sample indices) is set by
    the trainer before each loss."""

    def __init__(self, folder: Path, vocab: int, device: torch.device) -> None:
        self.values = np.load(folder / "values.npy", mmap_mode="r")
        self.indices = np.load(folder / "indices.npy", mmap_mode="r")
        self.lengths = np.load(folder / "lengths.npy")
        self.vocab, self.device = vocab, device
        self.model, self.pairs, self.seconds, self.sharded = None, None, 0.0, False
        self.idx: torch.Tensor | None = None

    def forward(self, batch: dict[str, torch.Tensor], hidden: bool = False) -> Any:
        if hidden:
            raise ValueError("loss.teacher_cache holds logits only; leave loss.intermediate out")
        t0 = time.perf_counter()
        rows, width = batch["input_ids"].shape
        logits = torch.full((rows, width, self.vocab), float("-inf"))
        for r, i in enumerate(self.idx.tolist()):
            n = min(int(self.lengths[i]), width)
            index = torch.from_numpy(np.asarray(self.indices[i, :n], dtype=np.int64))
            logits[r, :n].scatter_(-1, index, torch.from_numpy(np.asarray(self.values[i, :n], dtype=np.float32)))
        out = SimpleNamespace(logits=logits.to(self.device))
        self.seconds += time.perf_counter() - t0
        return out


def cached_teacher(acc: Any, teacher: Teacher, dataset: Any, top_k: int, meta: dict[str, Any], out_dir: Path,
                   vocab: int) -> CachedTeacher:
    """The cache of ``teacher`` on ``dataset`` (made now unless a matching one is on disk), opened for reading."""
    folder = out_dir / FOLDER
    meta = {**meta, "samples": len(dataset), "top_k": top_k}
    made = (folder / "meta.json").is_file() and json.loads((folder / "meta.json").read_text()) == meta
    if not made:
        values, indices, lengths = _one_pass(acc, teacher, dataset, top_k)
        if acc.is_main_process:
            with atomic_dir(folder) as tmp:
                np.save(tmp / "values.npy", values)
                np.save(tmp / "indices.npy", indices)
                np.save(tmp / "lengths.npy", lengths)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        acc.wait_for_everyone()
    return CachedTeacher(folder, vocab, acc.device)


def _one_pass(acc: Any, teacher: Teacher, dataset: Any, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = max(dataset[i]["input_ids"].numel() for i in range(len(dataset)))
    values = np.zeros((len(dataset), width, top_k), dtype=np.float32)
    indices = np.zeros((len(dataset), width, top_k), dtype=np.int32)
    lengths = np.zeros(len(dataset), dtype=np.int64)
    for i in range(len(dataset)):
        ids = dataset[i]["input_ids"].reshape(1, -1).to(acc.device)
        logits = teacher.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0].float()
        top = logits.topk(top_k, dim=-1)
        n = ids.shape[1]
        values[i, :n], indices[i, :n], lengths[i] = top.values.cpu().numpy(), top.indices.cpu().numpy(), n
    return values, indices, lengths
