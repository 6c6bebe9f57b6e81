"""Text sources → token ids: datasets names or local .txt/.jsonl, tokenized once, sampled with a seed."""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from pathlib import Path
from typing import Any

import torch

from prunelab.stages.io.config import TextSource
from prunelab.stages.io.named_data import fetch_command, resolve
from prunelab.stages.io.qa import QATextSource, render_qa, render_rows


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
    named = resolve(source)  # wikitext2 / arc-easy (and their Hub spellings): a local file first (docs/data.md)
    if named is not None:
        return _read_named(source, named)
    ds = _load_dataset(source.dataset, source.config, source.split, source.data_files, source.describe())
    if source.text_field not in ds.column_names:
        raise ValueError(f"dataset {source.describe()} has no column {source.text_field!r}; set text_field to one of {ds.column_names}")
    return source.join.join(ds[source.text_field])


def _read_named(source: TextSource, named: Any) -> str:
    """A named dataset split's text: its local file (checked against SHA256SUMS when listed) or its Hub split."""
    log = logging.getLogger(__name__)
    if named.local is not None:
        log.info(f"{source.dataset} {named.split}: {verify_checksum(str(named.local))}")
        if named.kind == "qa":
            return render_qa(QATextSource(qa_text=str(named.local), join=source.join))
        return named.local.read_text(encoding="utf-8").replace("\r\n", "\n")
    name, config, split = named.hub
    log.info(f"{source.dataset} {named.split}: no local file; reading datasets {name}/{config} {split}")
    ds = _load_dataset(name, config, split, None, named.describe())
    if named.kind == "qa":
        return render_rows(list(ds), QATextSource.model_fields["template"].default, source.join, f"{name}/{config} {split}")
    return source.join.join(ds["text"])


def _load_dataset(name: str, config: str | None, split: str, data_files: Any, what: str) -> Any:
    """``datasets.load_dataset``, with the two ways it fails on a user's machine said as a fix, not a traceback."""
    try:
        from datasets import load_dataset  # lazy: optional
    except ImportError:
        raise ValueError(f"{what} is read through the `datasets` package, which is not installed; `pip install "
                         "datasets`, or give a local file {path: …}") from None
    try:
        return load_dataset(name, config, split=split, data_files=data_files)
    except ConnectionError as exc:  # offline mode or no network, and nothing in the cache
        raise ValueError(f"{what} is not in the datasets cache and cannot be downloaded ({exc}); fetch it once where "
                         f"there is a network with `{fetch_command((name, config, split))}`, or give a local file "
                         "{path: …}") from None


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
