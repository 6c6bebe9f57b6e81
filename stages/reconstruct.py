"""Stage: block-local reconstruction, a recovery that needs no global training — each pruned block trained to
reproduce the dense block's output on calibration activations, one block at a time (the engine and its reasons:
:mod:`prunelab.stages.recovery.reconstruct`; docs/recovery.md, "Block-local reconstruction").

A stage of its own rather than a ``method`` of ``recover``: it shares none of the recover stage's trainer (no
accelerate loop, no adapter kept, no data packing, no loss over logits); its settings are per block. Like
``recover`` it leaves the model ``recovered`` and its statistics in ``recover_info`` (evaluation reads it alike).

```yaml
reconstruct:
  type: reconstruct
  inputs: pruned          # pruned: the reconstructed blocks' own outputs feed the next block | dense
  train: weights          # weights: every kept weight of the block | lora (merged after each block)
  sublayers: together     # together: the block output | separate: attention first, then the MLP
  steps: 100              # Adam steps per block (separate: per sublayer), batch_size: 8 windows per step
  lr: 1.0e-4              # schedule: constant | cosine (from lr to 0 over each phase's steps)
  loss: mse               # | token: per-token relative error | channel: per-channel | fisher: BRECQ's weights
  skip_tokens: 0          # first positions of each window left out of the loss
  # data: {source: {path: ../shared/data/wikitext2/valid.txt}, num_samples: 256, seq_len: 256}  (default: the run's calibration)
```
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from prunelab.registry import register_stage
from prunelab.stages.calibration.sources import CalibrationSource, calibration_windows
from prunelab.stages.core.config import StrictModel

if TYPE_CHECKING:
    from prunelab.context import RunContext

__all__ = ["ReconstructConfig", "restore", "run"]


class ReconstructLora(StrictModel):
    """The low-rank update of ``train: lora``: W + (alpha / rank)·B·A on every trained linear, B = 0 at the start."""

    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="scale alpha / r")


class ReconstructData(StrictModel):
    """Windows of their own, instead of the calibrate stage's (``self_generated`` text is the DENSE model's)."""

    source: CalibrationSource = Field(..., description="{path: …} (a valid/train split, never test), {qa_text: …}, "
                                      "{self_generated: {…}} or {mix: […]}")
    num_samples: int = Field(128, ge=1, description="windows")
    seq_len: int = Field(256, ge=8, description="tokens per window")


class ReconstructConfig(StrictModel):
    type: Literal["reconstruct"]
    inputs: Literal["pruned", "dense"] = Field(
        "pruned", description="pruned: block i sees the reconstructed blocks 0..i-1's outputs (it also corrects the "
        "error that reaches it); dense: the dense model's block-i inputs (blocks independent)")
    train: Literal["weights", "lora"] = Field("weights", description="weights: every parameter of the block (norms "
                                              "included); lora: a low-rank update of its linears, merged after")
    sublayers: Literal["together", "separate"] = Field(
        "together", description="together: the block's output; separate: the attention (and its norm) on the dense "
        "residual after attention, then the MLP (and its norm) on the block output")
    steps: int = Field(100, ge=1, description="Adam steps per block (separate: per sublayer)")
    batch_size: int = Field(8, ge=1, description="windows per step (and per forward of the passes around it)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (lora wants ~10× more than weights)")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning rate over a phase's steps: constant, or cosine decay from lr to 0")
    loss: Literal["mse", "token", "channel", "fisher"] = Field(
        "mse", description="mse: plain MSE on the residual stream (ruled by a few massive activations: SmolLM2's "
        "first token carries ~10^4× a typical token's mean square); token: each token's squared error over the "
        "dense token's mean square; channel: over each channel's mean square in the dense targets; fisher: times the "
        "dense model's squared loss gradient there (BRECQ Eq. 10; one block-wise backward of the dense model first)")
    skip_tokens: int = Field(0, ge=0, description="the first N positions of every window left out of the loss (the "
                             "attention-sink token whose huge activation only needs to stay huge)")
    lora: ReconstructLora = Field(default_factory=ReconstructLora, description="train: lora only")
    data: ReconstructData | None = Field(None, description="None: the calibrate stage's windows")
    num_windows: int | None = Field(None, ge=1, description="use N of the windows, evenly spread over them (a mix "
                                    "source lists its parts in order); None: all")
    memory_budget_gb: float = Field(4.0, ge=0, description="boundary states held in memory; past it memory-mapped "
                                    "files in the stage folder")

    @model_validator(mode="after")
    def _lora_applies(self) -> ReconstructConfig:
        if "lora" in self.model_fields_set and self.train != "lora" and self.lora != ReconstructLora():  # a mistake
            raise ValueError("lora: {rank, alpha} applies to train: lora; set train: lora or leave lora out")
        if self.loss == "fisher" and self.sublayers == "separate":
            raise ValueError("loss: fisher weighs the block OUTPUT (the attention phase of sublayers: separate has "
                             "no weights): use sublayers: together with loss: fisher, or another loss")
        if self.data is not None and self.skip_tokens >= self.data.seq_len:
            raise ValueError(f"skip_tokens: {self.skip_tokens} leaves none of data.seq_len {self.data.seq_len} tokens "
                             "in the loss; lower skip_tokens (1 skips the first, attention-sink token)")
        return self

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        prunes = [stages[k] for k in seen if stages[k].type in ("prune", "iterate")]
        if not prunes:
            return ["reconstruction matches pruned blocks to dense ones: put a `prune` stage before it"]
        units = [getattr(p, "prune", p).units for p in prunes]  # an iterate stage holds its prune settings
        if any(u != "width" for u in units):
            return [f"block-local reconstruction pairs pruned block i with dense block i of the same width: it follows "
                    f"a width plan (prune units: width), not units {', '.join(u for u in units if u != 'width')} "
                    "(a depth plan, or hidden channels)"]
        calibrates = [stages[k] for k in seen if stages[k].type == "calibrate"]
        if self.data is None and not calibrates:
            return ["needs calibration windows: a `calibrate` stage before it, or data: {source, num_samples, seq_len}"]
        if self.data is None and self.skip_tokens >= calibrates[-1].seq_len:
            return [f"skip_tokens: {self.skip_tokens} leaves none of the calibration windows' {calibrates[-1].seq_len} "
                    "tokens in the loss; lower it (1 skips the first, attention-sink token)"]
        return []


def run(ctx: RunContext, cfg: ReconstructConfig) -> dict[str, Any]:
    import torch  # lazy: torch-free

    from prunelab.stages.io.models import load_model  # lazy: torch-free
    from prunelab.stages.recovery.reconstruct import reconstruct  # lazy: torch-free

    kind = getattr(ctx.plan, "kind", None)
    if kind in ("depth", "hidden"):
        raise ValueError(f"stages.{ctx.stage_key}: the {kind} plan changes the block count or width, so block i has "
                         "no dense block of the same shape to match; reconstruct after a width plan (heads, channels)")
    teacher = load_model(ctx.recipe.model)[0]
    if cfg.data is None:
        windows = ctx.calibration
    else:
        windows = calibration_windows(cfg.data.source, teacher, ctx.tokenizer, cfg.data.num_samples, cfg.data.seq_len,
                                      ctx.recipe.seed, ctx.stage_dir / "generated", ctx.progress)
    if cfg.num_windows is not None and cfg.num_windows < len(windows):
        windows = windows[torch.linspace(0, len(windows) - 1, cfg.num_windows).round().long()]
    info = reconstruct(ctx.model, teacher, windows, cfg, ctx.stage_dir, seed=ctx.recipe.seed, resume=ctx.resume,
                       progress=ctx.progress)
    del teacher
    ctx.state = "recovered"
    ctx.recover_info = {"pruned": info}
    return info


def restore(ctx: RunContext, cfg: ReconstructConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    """The reconstructed blocks' saved weights back into the pruned model."""
    from prunelab.stages.recovery.reconstruct import restore_blocks  # lazy: torch-free

    restore_blocks(ctx.model, stage_dir)
    ctx.state = "recovered"
    ctx.recover_info = {"pruned": dict(outputs)}


register_stage("reconstruct", ReconstructConfig, run, restore)
