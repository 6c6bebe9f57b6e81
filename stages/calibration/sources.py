"""Calibration sources beyond a file: text the model writes itself, and weighted blends of sources.

- ``self_generated`` (Williams, Chrysostomou & Aletras, "Self-calibration for Language Model
  Quantization and Pruning", NAACL 2025, arXiv 2410.17170): the dense model samples N sequences of
  L tokens from seeded prompts (its BOS token, or the first tokens of windows of a text source), so
  calibration follows the model's own distribution instead of one corpus. The paper samples from
  BOS with a temperature that moves linearly over the sequence; ``temperature`` → ``temperature_end``
  does that, and top-p / top-k truncate as in ``generate``. Sequences are written to the stage folder
  batch by batch, so a killed run resumes where it stopped and a finished one never regenerates.
- ``mix``: a weighted blend — each part contributes round(weight share × N) windows, remainder to
  the heaviest part, in the order listed.

All settings here are torch-free (validated with the recipe); generation imports torch lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Field, Tag

from prunelab.stages.core.config import StrictModel
from prunelab.stages.io.config import TextSource
from prunelab.stages.io.qa import QATextSource


class SamplingSettings(StrictModel):
    """How the dense model samples text (self-generated calibration, teacher-generated recovery data)."""

    temperature: float = Field(1.0, gt=0, description="sampling temperature at the first generated token")
    temperature_end: float | None = Field(None, gt=0, description="temperature at the last token (linear schedule); none: constant")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling threshold (1 disables)")
    top_k: int = Field(0, ge=0, description="keep only the k most likely tokens (0 disables)")
    batch_size: int = Field(8, ge=1, description="sequences generated together (one cached shard per batch)")


class SelfGeneratedSettings(SamplingSettings):
    """How the dense model writes its own calibration text."""

    prompt: Literal["bos"] | TextSource | QATextSource = Field(
        "bos", description="'bos': start from the BOS token only; or a text source whose windows' first tokens start each sequence")
    prompt_tokens: int = Field(8, ge=1, description="prompt length when prompts come from a text source")


class SelfGeneratedSource(StrictModel):
    self_generated: SelfGeneratedSettings = Field(default_factory=SelfGeneratedSettings)

    def describe(self) -> str:
        s = self.self_generated
        start = "BOS" if s.prompt == "bos" else f"{s.prompt_tokens} tokens of {s.prompt.describe()}"
        temp = f"T={s.temperature}" + (f"→{s.temperature_end}" if s.temperature_end is not None else "")
        return f"self-generated (from {start}, {temp}, top-p {s.top_p}, top-k {s.top_k})"


class MixPart(StrictModel):
    source: Annotated[
        Union[  # noqa: UP007
            Annotated[TextSource, Tag("text")],
            Annotated[QATextSource, Tag("qa_text")],
            Annotated[SelfGeneratedSource, Tag("self_generated")],
        ],
        Discriminator(lambda v: source_kind(v)),
    ]
    weight: float = Field(..., gt=0, description="relative share of the windows")


class MixSource(StrictModel):
    mix: list[MixPart] = Field(..., min_length=2, description="two or more weighted sources")

    def describe(self) -> str:
        total = sum(p.weight for p in self.mix)
        return "mix(" + ", ".join(f"{p.weight / total:.0%} {p.source.describe()}" for p in self.mix) + ")"


def source_kind(value: Any) -> str:
    """Which source a mapping describes, by its distinguishing key (so errors name that kind's fields only)."""
    if isinstance(value, BaseModel):
        return {SelfGeneratedSource: "self_generated", MixSource: "mix", QATextSource: "qa_text"}.get(type(value), "text")
    if isinstance(value, dict):
        for key in ("self_generated", "mix", "qa_text"):
            if key in value:
                return key
    return "text"


CalibrationSource = Annotated[
    Union[  # noqa: UP007
        Annotated[TextSource, Tag("text")],
        Annotated[QATextSource, Tag("qa_text")],
        Annotated[SelfGeneratedSource, Tag("self_generated")],
        Annotated[MixSource, Tag("mix")],
    ],
    Discriminator(source_kind),
]


def split_counts(weights: list[float], n: int) -> list[int]:
    """Windows per part: round(share × n), the remainder (±) given to the heaviest part."""
    total = sum(weights)
    counts = [round(w / total * n) for w in weights]
    heaviest = max(range(len(weights)), key=lambda i: (weights[i], -i))
    counts[heaviest] += n - sum(counts)
    if min(counts) < 0:
        raise ValueError(f"cannot split {n} windows by weights {weights}")
    return counts


def calibration_windows(source: CalibrationSource, model: Any, tokenizer: Any, num_samples: int, seq_len: int,
                        seed: int, cache_dir: Path, progress: bool = True) -> Any:
    """LongTensor [num_samples, seq_len] from any calibration source (cache_dir keeps generated shards)."""
    import torch

    from prunelab.stages.io.text import sample_windows, tokenized_source

    if isinstance(source, MixSource):
        counts = split_counts([p.weight for p in source.mix], num_samples)
        parts = [calibration_windows(p.source, model, tokenizer, c, seq_len, seed + i, cache_dir / f"mix-{i}", progress)
                 for i, (p, c) in enumerate(zip(source.mix, counts, strict=True)) if c > 0]
        return torch.cat(parts)
    if isinstance(source, SelfGeneratedSource):
        from prunelab.stages.calibration.generate import self_generate

        return self_generate(model, tokenizer, source.self_generated, num_samples, seq_len, seed, cache_dir, progress)
    return sample_windows(tokenized_source(tokenizer, source), num_samples, seq_len, seed)
