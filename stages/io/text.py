"""Text sources → token ids: datasets names or local .txt/.jsonl, tokenized once, sampled with a seed."""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch

from prunelab.stages.io.config import TextSource
from prunelab.stages.io.qa import QATextSource, render_qa


def read_text(source: TextSource | QATextSource) -> str:
    """All of a source's text as one string (rows joined with ``source.join``).

    A ``.txt`` file is taken as it is (it already is the joined text, e.g. WikiText-2 raw); a
    ``.jsonl`` file is one row per line with the text under ``text_field``; a ``qa_text`` file is
    rendered question + correct answer per row (``prunelab.stages.io.qa``).
    """
    if isinstance(source, QATextSource):
        return render_qa(source)
    if source.path is not None:
        path = Path(source.path)
        if path.suffix == ".txt":
            return path.read_text(encoding="utf-8").replace("\r\n", "\n")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return source.join.join(_field(row, source.text_field, path) for row in rows)
    from datasets import load_dataset

    ds = load_dataset(source.dataset, source.config, split=source.split, data_files=source.data_files)
    if source.text_field not in ds.column_names:
        raise ValueError(f"dataset {source.describe()} has no column {source.text_field!r}; set text_field to one of {ds.column_names}")
    return source.join.join(ds[source.text_field])


def _field(row: dict[str, Any], key: str, path: Path) -> str:
    if key not in row:
        raise ValueError(f"{path}: a row has no key {key!r}; set text_field to one of {sorted(row)}")
    return str(row[key])


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize once, as the standard perplexity protocol does: 1-D LongTensor of ids."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True, verbose=False).input_ids[0]
    return ids.to(torch.long)


_TOKENIZED: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def tokenized_source(tokenizer: Any, source: TextSource | QATextSource) -> torch.Tensor:
    """``tokenize_text(read_text(source))``, memoized per tokenizer and source: a run evaluates the same test
    text before and after pruning, and tokenizing it is the slow part for small models."""
    cache = _TOKENIZED.setdefault(tokenizer, {})
    key = source.model_dump_json()
    if key not in cache:
        cache[key] = tokenize_text(tokenizer, read_text(source))
    return cache[key]


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """N windows of L consecutive tokens at seeded random offsets (GPTQ/SparseGPT/Wanda practice)."""
    if ids.numel() <= seq_len:
        raise ValueError(f"source has {ids.numel()} tokens, fewer than seq_len={seq_len}; lower seq_len or use more text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def verify_checksum(path: str) -> str:
    """Check ``path`` against the nearest ``SHA256SUMS`` above it; refuse a changed file.

    Returns a short description of what was checked ("unlisted" when no checksum file covers it).
    """
    import hashlib

    file = Path(path).resolve()
    for folder in file.parents:
        sums = folder / "SHA256SUMS"
        if sums.is_file():
            rel = file.relative_to(folder).as_posix()
            expected = {name.strip(): digest for digest, name in (l.split(None, 1) for l in sums.read_text().splitlines() if l.strip())}
            if rel not in expected:
                return f"{path}: unlisted"
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            if digest != expected[rel]:
                raise ValueError(f"{path}: sha256 {digest} does not match {sums} ({expected[rel]}); restore the original file")
            return f"{path}: sha256 ok"
    return f"{path}: unlisted"
