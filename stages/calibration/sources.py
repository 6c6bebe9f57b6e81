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

Every source is registered (``register_source``: settings class, distinguishing key, windows function), so a new
source is one registration and the recipe field reads the registry. All settings here are torch-free (validated
with the recipe); the windows functions are resolved lazily, so ``generate`` (torch) imports this module, never
the reverse.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, Field, PlainSerializer, PlainValidator, SerializationInfo, Tag, ValidationError,
                      WithJsonSchema)

from prunelab.stages.core.config import StrictModel
from prunelab.stages.core.registry import Registry
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


@dataclass(frozen=True)
class SourceSpec:
    """A registered calibration source: its settings class, the key that tells its mapping apart (None: the
    default, a plain text source) and ``windows`` — ``(source, model, tokenizer, n, seq_len, seed, cache_dir,
    progress) -> LongTensor [n, seq_len]``, a callable or ``"module:function"`` (resolved on first use, so
    validating a recipe never imports torch)."""

    name: str
    config: type[StrictModel]
    key: str | None
    windows: str | Callable[..., Any]
    in_mix: bool = True  # may be a part of a ``mix``

    def load(self) -> Callable[..., Any]:
        if not isinstance(self.windows, str):
            return self.windows
        module, _, fn = self.windows.partition(":")
        return getattr(importlib.import_module(module), fn)


SOURCES: Registry[SourceSpec] = Registry("calibration source")


def register_source(name: str, config: type[StrictModel], key: str | None, windows: str | Callable[..., Any],
                    in_mix: bool = True) -> SourceSpec:
    """Register a calibration source; a recipe picks it by ``key`` (a top-level key of its mapping)."""
    taken = [n for n in SOURCES if SOURCES.get(n).key == key]
    if taken:
        raise ValueError(f"calibration source {name!r}: key {key!r} already picks {taken[0]!r}")
    return SOURCES.register(name, SourceSpec(name, config, key, windows, in_mix))


def source_kind(value: Any) -> str:
    """Which registered source a mapping (or settings object) describes, by its distinguishing key, so errors name
    that source's fields only; a mapping without any registered key is a text source."""
    specs = [SOURCES.get(n) for n in SOURCES]
    if isinstance(value, BaseModel):
        for spec in specs:
            if type(value) is spec.config:
                return spec.name
    if isinstance(value, dict):
        for spec in specs:
            if spec.key is not None and spec.key in value:
                return spec.name
    return next(s.name for s in specs if s.key is None)


def _validated(value: Any, in_mix: bool) -> Any:
    spec = SOURCES.get(source_kind(value))
    if in_mix and not spec.in_mix:
        raise ValueError(f"a {spec.name} source cannot be part of a mix; list its parts in this mix instead")
    if isinstance(value, spec.config):
        return value
    try:
        return spec.config.model_validate(value)
    except ValidationError as exc:  # the source's name in the error path, as a tagged union puts it
        raise ValidationError.from_exception_data("calibration source", [
            {"type": e["type"], "loc": (spec.name, *e["loc"]), "input": e["input"],
             **({"ctx": e["ctx"]} if "ctx" in e else {})} for e in exc.errors()]) from None


def _field(in_mix: bool) -> Any:
    """The field type of a source: validated through the registry when validated (a source registered after this
    module — a plugin, a test — is accepted without touching this file); its annotation, the union of the sources
    registered so far tagged by name, only tells error messages which fields a source has."""
    members = tuple(Annotated[SOURCES.get(n).config, Tag(n)] for n in SOURCES if not in_mix or SOURCES.get(n).in_mix)
    return Annotated[Union[members], PlainValidator(lambda v: _validated(v, in_mix)),  # noqa: UP007
                     PlainSerializer(_dumped),
                     WithJsonSchema({"type": "object", "description": "a registered calibration source"})]


def _dumped(value: Any, info: SerializationInfo) -> Any:
    """A source dumps as its own settings class does (the tagged union above cannot tell a plugin's class apart, and
    pydantic warned on every dump); the output is the same mapping, so chain hashes are unchanged."""
    return value.model_dump(mode=info.mode) if isinstance(value, BaseModel) else value


_HERE = "prunelab.stages.calibration.sources"
register_source("text", TextSource, None, f"{_HERE}:text_windows")
register_source("qa_text", QATextSource, "qa_text", f"{_HERE}:text_windows")
register_source("self_generated", SelfGeneratedSource, "self_generated",
                "prunelab.stages.calibration.generate:generated_windows")
MixPartSource = _field(in_mix=True)


class MixPart(StrictModel):
    source: MixPartSource
    weight: float = Field(..., gt=0, description="relative share of the windows")


class MixSource(StrictModel):
    mix: list[MixPart] = Field(..., min_length=2, description="two or more weighted sources")

    def describe(self) -> str:
        total = sum(p.weight for p in self.mix)
        return "mix(" + ", ".join(f"{p.weight / total:.0%} {p.source.describe()}" for p in self.mix) + ")"


def split_counts(weights: list[float], n: int) -> list[int]:
    """Windows per part: round(share × n), the remainder (±) given to the heaviest part."""
    total = sum(weights)
    counts = [round(w / total * n) for w in weights]
    heaviest = max(range(len(weights)), key=lambda i: (weights[i], -i))
    counts[heaviest] += n - sum(counts)
    if min(counts) < 0:
        raise ValueError(f"cannot split {n} windows by weights {weights}")
    return counts


def calibration_windows(source: Any, model: Any, tokenizer: Any, num_samples: int, seq_len: int,
                        seed: int, cache_dir: Path, progress: bool = True) -> Any:
    """LongTensor [num_samples, seq_len] from any registered calibration source (cache_dir keeps generated shards)."""
    return SOURCES.get(source_kind(source)).load()(source, model, tokenizer, num_samples, seq_len, seed, cache_dir,
                                                   progress)


def text_windows(source: TextSource | QATextSource, model: Any, tokenizer: Any, num_samples: int, seq_len: int,
                 seed: int, cache_dir: Path, progress: bool = True) -> Any:
    """N windows of L tokens at seeded offsets of the source's joined token stream."""
    from prunelab.stages.io.text import sample_windows, tokenized_source  # lazy: torch-free

    return sample_windows(tokenized_source(tokenizer, source), num_samples, seq_len, seed)


def mix_windows(source: MixSource, model: Any, tokenizer: Any, num_samples: int, seq_len: int, seed: int,
                cache_dir: Path, progress: bool = True) -> Any:
    """Each part's share of the windows (``split_counts``), part i drawn with seed + i, concatenated in order."""
    import torch  # lazy: torch-free

    counts = split_counts([p.weight for p in source.mix], num_samples)
    parts = [calibration_windows(p.source, model, tokenizer, c, seq_len, seed + i, cache_dir / f"mix-{i}", progress)
             for i, (p, c) in enumerate(zip(source.mix, counts, strict=True)) if c > 0]
    return torch.cat(parts)


register_source("mix", MixSource, "mix", f"{_HERE}:mix_windows", in_mix=False)
CalibrationSource = _field(in_mix=False)
