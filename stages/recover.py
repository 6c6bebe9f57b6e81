"""Stage: recover a pruned model with LoRA / QLoRA (peft), under accelerate (DDP or DeepSpeed), then
merge the adapter into FULL-precision weights so the result is again a plain dense model.

The training loop lives in :mod:`stages.recovery.trainer`; this file is the stage's lifecycle: settings,
the dense *control* (the same recovery given to the unpruned model, because in-domain fine-tuning
alone lowers perplexity), and restoring a finished recovery on ``--resume``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.registry import register_stage
from stages.core.config import StrictModel
from stages.io.config import TextSource

DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RecoveryData(StrictModel):
    source: TextSource = Field(..., description="training text (valid/train splits, never test) or instruction rows")
    format: Literal["text", "alpaca"] = Field(
        "text", description="text: packed language modelling; alpaca: instruction/input/output rows, loss on the response"
    )
    seq_len: int = Field(256, ge=8, description="text: tokens per packed block; alpaca: cutoff length (LLM-Pruner: 256)")
    max_samples: int | None = Field(None, ge=1, description="use only the first N blocks / rows")
    train_on_inputs: bool = Field(False, description="alpaca: also put loss on the prompt tokens")
    shuffle: bool = Field(True, description="seeded shuffle per epoch (the same order on every rank)")


class RecoverConfig(StrictModel):
    type: Literal["recover"]
    method: Literal["lora", "qlora"] = Field("lora", description="qlora: base weights in NF4 (bitsandbytes) while training")
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DECODER_LINEARS), description="default: every decoder linear")
    data: RecoveryData
    batch_size: int = Field(64, ge=1, description="GLOBAL batch per optimizer step = micro_batch_size × accumulation × processes")
    micro_batch_size: int = Field(4, ge=1, description="samples per forward on each process")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip gradients (None: off)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% slower")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype of the frozen base while training; auto = bfloat16 where the GPU has it "
        "(fp16 recovery of Llama-2 hit NaN losses in LLM-Pruner), else float32"
    )
    save_every: int | None = Field(None, ge=1, description="checkpoint every N optimizer steps (for --resume)")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    control: bool = Field(False, description="also give the DENSE model the same recovery and evaluate it as `control`")
    compare_plain_steps: int = Field(0, ge=0, description="time N steps of a plain peft loop (no accelerate) on the "
                                     "same batches, in the same process, for the tokens/s comparison")
    record_samples: bool = Field(True, description="write the sample indices each rank consumed (samples.json)")

    @model_validator(mode="after")
    def _sizes(self) -> RecoverConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")
        unknown = [m for m in self.target_modules if m not in DECODER_LINEARS and m != "lm_head"]
        if unknown:
            raise ValueError(f"target_modules {unknown}: choose from {', '.join(DECODER_LINEARS)}")
        return self

    def accumulation(self, num_processes: int) -> int:
        """Micro-batches per process per optimizer step, so that the GLOBAL batch is the recipe's."""
        per_step = self.micro_batch_size * num_processes
        if self.batch_size % per_step:
            raise ValueError(
                f"stages.recover: batch_size={self.batch_size} is not divisible by micro_batch_size × processes "
                f"= {self.micro_batch_size} × {num_processes}; change batch_size or micro_batch_size"
            )
        return self.batch_size // per_step

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        if not any(stages[k].type == "prune" for k in seen):
            return ["recovery heals a pruned model: put a `prune` stage before it"]
        return []


def run(ctx: Any, cfg: RecoverConfig) -> dict[str, Any]:
    from stages.recovery.trainer import recover_model

    if cfg.method == "qlora" and getattr(ctx.model.config, "prunelab_layer_shapes", None):
        raise ValueError("stages.recover: method qlora needs uniform layer widths (NF4 loading builds a vanilla "
                         "model); use method: lora, or prune with allocation: uniform")
    info = recover_model(ctx, cfg, ctx.model, ctx.stage_dir, "pruned")
    ctx.model = info.pop("model")
    ctx.state = "recovered"
    ctx.recover_info = {"pruned": info}
    if cfg.control:
        from stages.io.models import load_model

        dense, _ = load_model(ctx.recipe.model)
        control = recover_model(ctx, cfg, dense, ctx.stage_dir / "control", "control")
        ctx.variants["control"] = control.pop("model")
        ctx.recover_info["control"] = control
    return ctx.recover_info


def restore(ctx: Any, cfg: RecoverConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    """Re-merge the saved adapters: cheaper than keeping merged copies and exact (same weights)."""
    from stages.recovery.trainer import merge_adapter

    ctx.model = merge_adapter(ctx.model, stage_dir / "adapter")
    ctx.state = "recovered"
    ctx.recover_info = dict(outputs)
    if cfg.control:
        from stages.io.models import load_model

        dense, _ = load_model(ctx.recipe.model)
        ctx.variants["control"] = merge_adapter(dense, stage_dir / "control" / "adapter")


register_stage("recover", RecoverConfig, run, restore)
