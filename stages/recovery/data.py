"""Recovery training data: packed plain text, or Alpaca-style instructions with loss on the response.

Every example carries its index, so a distributed run can prove which rank consumed which sample. The
sample order is a seeded permutation per epoch, the same on every rank; accelerate shards it by batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import load_dataset

from prunelab.stages.io.config import TextSource
from prunelab.stages.io.text import read_text, tokenize_text
from prunelab.stages.recovery.config import RecoveryData

IGNORE = -100

# The Alpaca prompt (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), as LLM-Pruner's post-training uses it.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class IndexedExamples(torch.utils.data.Dataset):
    """A list of token examples; ``__getitem__`` adds ``idx`` so consumed samples can be recorded."""

    def __init__(self, examples: list[dict[str, torch.Tensor]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"idx": i, **self.examples[i]}


def packed_text(ids: torch.Tensor, seq_len: int, max_samples: int | None) -> IndexedExamples:
    """Language modelling: the token stream cut into consecutive ``seq_len`` blocks (remainder dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"recovery text has {ids.numel()} tokens, less than one block of seq_len={seq_len}")
    if max_samples is not None:
        n = min(n, max_samples)
    blocks = ids[: n * seq_len].view(n, seq_len)
    return IndexedExamples([{"input_ids": b, "labels": b.clone()} for b in blocks])


def read_rows(source: TextSource) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json file or a `datasets` split, as dicts."""
    if source.path is not None:
        path = Path(source.path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    ds = load_dataset(source.dataset, source.config, split=source.split, data_files=source.data_files)
    return list(ds)


def alpaca_examples(rows: list[dict[str, Any]], tokenizer: Any, cutoff_len: int, train_on_inputs: bool,
                    max_samples: int | None) -> IndexedExamples:
    """Instruction tuning as Alpaca-LoRA / LLM-Pruner do: prompt + output + EOS, cut at ``cutoff_len``,
    labels masked (-100) over the prompt unless ``train_on_inputs``."""
    for key in ("instruction", "output"):
        if rows and key not in rows[0]:
            raise ValueError(f"instruction data needs `instruction`, `input`, `output` fields; the first row has {sorted(rows[0])}")
    examples = []
    for row in rows[: max_samples or len(rows)]:
        template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=row["instruction"], input=row.get("input", ""))
        prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
        full_ids = tokenizer(prompt + row["output"], add_special_tokens=True).input_ids + [tokenizer.eos_token_id]
        full_ids = full_ids[:cutoff_len]
        labels = list(full_ids)
        if not train_on_inputs:
            n = min(len(prompt_ids), len(labels))
            labels[:n] = [IGNORE] * n
        examples.append({"input_ids": torch.tensor(full_ids), "labels": torch.tensor(labels)})
    if not examples:
        raise ValueError("instruction data is empty")
    return IndexedExamples(examples)


def collate(pad_id: int):
    """Right-pad a batch; padded positions are masked out of attention and loss."""

    def fn(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(b["input_ids"].numel() for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = b["input_ids"].numel()
            ids[i, :n], labels[i, :n], mask[i, :n] = b["input_ids"], b["labels"], 1
        return {"idx": torch.tensor([b["idx"] for b in batch]), "input_ids": ids, "labels": labels, "attention_mask": mask}

    return fn


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The global sample order of one epoch: a seeded permutation, the same on every rank."""
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, identical on every rank (accelerate shards the batches)."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch, self.shuffle))

    def __len__(self) -> int:
        return self.n


def build_dataset(tokenizer: Any, data: RecoveryData, generated: torch.Tensor | None = None) -> IndexedExamples:
    """The recipe's training examples: packed text blocks or Alpaca rows, tokenized; ``generated`` (the teacher's
    sequences of ``data.teacher_generate``, [n, seq_len]) come after the source's blocks, or alone."""
    if data.teacher_generate is not None and generated is None:
        raise ValueError("data.teacher_generate: the teacher's sequences were not generated (pass `generated`)")
    if generated is not None:
        extra = [{"input_ids": row, "labels": row.clone()} for row in generated]
        if not data.teacher_generate or not data.teacher_generate.with_source:
            return IndexedExamples(extra)
        own = packed_text(tokenize_text(tokenizer, read_text(data.source)), data.seq_len, data.max_samples)
        return IndexedExamples(own.examples + extra)
    if data.format == "text":
        return packed_text(tokenize_text(tokenizer, read_text(data.source)), data.seq_len, data.max_samples)
    return alpaca_examples(read_rows(data.source), tokenizer, data.seq_len, data.train_on_inputs, data.max_samples)


def make_loader(dataset: IndexedExamples, micro_batch_size: int, seed: int, shuffle: bool,
                pad_id: int) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """Micro-batches in the epoch's order (incomplete last micro-batch dropped), and the sampler to set epochs on."""
    sampler = EpochSampler(len(dataset), seed, shuffle)
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler,
                                         collate_fn=collate(pad_id), drop_last=True)
    return loader, sampler
