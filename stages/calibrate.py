"""Stage: calibration data — N windows of L tokens, drawn with the seed, saved for resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.registry import register_stage
from stages.core.config import StrictModel
from stages.io.config import TextSource


class CalibrateConfig(StrictModel):
    type: Literal["calibrate"]
    source: TextSource = Field(..., description="calibration text (valid/train splits only, never test)")
    num_samples: int = Field(32, ge=1, description="number of windows N")
    seq_len: int = Field(512, ge=2, description="tokens per window L")


def run(ctx: Any, cfg: CalibrateConfig) -> dict[str, Any]:
    import torch

    from stages.io.text import read_text, sample_windows, tokenize_text

    ids = tokenize_text(ctx.tokenizer, read_text(cfg.source))
    ctx.calibration = sample_windows(ids, cfg.num_samples, cfg.seq_len, ctx.recipe.seed)
    torch.save(ctx.calibration, ctx.stage_dir / "calibration.pt")
    return {"source": cfg.source.describe(), "num_samples": cfg.num_samples, "seq_len": cfg.seq_len, "source_tokens": ids.numel()}


def restore(ctx: Any, cfg: CalibrateConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    import torch

    ctx.calibration = torch.load(stage_dir / "calibration.pt")


register_stage("calibrate", CalibrateConfig, run, restore)
