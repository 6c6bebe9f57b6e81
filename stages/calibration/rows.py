"""LLM-Pruner's calibration sampler: whole rows of a text source, one random slice each.

The official code (horseee/LLM-Pruner, ``LLMPruner/datasets/example_samples.py``, ``get_bookcorpus``) draws, with
Python's ``random`` seeded once (``--seed``, 42 by default), N distinct rows that tokenize to at least L tokens,
each tokenized on its own (with the tokenizer's special tokens), and keeps a random L-token slice of each. The
same draws from ``random.Random(seed)`` give the same windows when the rows are the same (a ``.txt`` file is one
row per line, empty lines included, as the ``datasets`` text builder reads it). docs/llm-pruner-parity.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from datasets import load_dataset

from prunelab.stages.io.config import TextSource


def text_rows(source: TextSource) -> list[str]:
    """A text source's rows: the lines of a ``.txt`` file, the ``text_field`` of each ``.jsonl`` line or dataset row."""
    if source.path is not None:
        path = Path(source.path)
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        if path.suffix == ".txt":
            return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
        return [str(json.loads(line)[source.text_field]) for line in text.splitlines() if line.strip()]
    ds = load_dataset(source.dataset, source.config, split=source.split, data_files=source.data_files)
    return [str(t) for t in ds[source.text_field]]


def llm_pruner_windows(rows: list[str], tokenizer: Any, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """LongTensor [num_samples, seq_len], drawn as the official ``get_bookcorpus`` does with ``random.seed(seed)``."""
    cache: dict[int, torch.Tensor] = {}

    def ids(i: int) -> torch.Tensor:
        if i not in cache:
            cache[i] = tokenizer(rows[i], return_tensors="pt").input_ids
        return cache[i]

    rng, history, out = random.Random(seed), [], []
    for _ in range(num_samples):
        while True:
            i = rng.randint(0, len(rows) - 1)
            if ids(i).shape[1] >= seq_len and i not in history:
                history.append(i)
                break
            if len(cache) == len(rows):  # every row tried: no other row is long enough (the official code loops forever)
                raise ValueError(f"only {len(history)} rows tokenize to ≥ {seq_len} tokens, fewer than num_samples="
                                 f"{num_samples}; lower seq_len or num_samples, or use sampling: windows")
        j = rng.randint(0, ids(i).shape[1] - seq_len)
        out.append(ids(i)[:, j : j + seq_len])
    return torch.cat(out, dim=0).to(torch.long)
