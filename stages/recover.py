"""Stage: recover a pruned model with LoRA / QLoRA (peft) or full fine-tuning, under accelerate (DDP or DeepSpeed),
by cross-entropy or by distillation from the dense model, then merge the adapter into FULL-precision weights so
the result is again a plain dense model.

The trainer and its settings live in :mod:`stages.recovery`; this file is the stage's lifecycle: its
recipe section, the dense *control* (the same recovery given to the unpruned model, because in-domain
fine-tuning alone lowers perplexity, handed to later stages as ``ctx.variants["control"]``), the dense
*teacher* of a distillation loss (reloaded from the recipe's model source: prune changed ``ctx.model`` in
place), and restoring a finished recovery on ``--resume`` from its own folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from prunelab.registry import register_stage
from prunelab.stages.io.card import write_adapter_cards
from prunelab.stages.recovery.config import RecoveryData, RecoverySettings, flat_settings, migrate_flat_keys

if TYPE_CHECKING:
    from prunelab.context import RunContext

__all__ = ["RecoverConfig", "RecoveryData", "restore", "run"]


class RecoverConfig(RecoverySettings):
    """The ``recover`` stage: the trainer's settings in groups, plus ``control``.

    ```yaml
    recover:
      type: recover
      method: lora                  # lora | qlora | full
      loss: {type: kd, temperature: 1.0, top_k: 0}   # ce | kd | ce+kd (kd_ratio); kd needs the dense teacher
                                    # + intermediate: {weight, kind}, teacher_cache: true (with top_k > 0)
      data: {source: {path: ../shared/data/wikitext2/valid.txt}, seq_len: 256}
                                    # + teacher_generate: {num_samples: 256, prompt_tokens: 32} (the dense model's text)
      lora: {rank: 8, alpha: 16, dropout: 0.05}
      optimizer: {lr: 3.0e-3, warmup_steps: 10}
      loop: {batch_size: 4, micro_batch_size: 4, max_steps: 150}
      checkpoint: {save_every: 50}
      control: true
    ```

    Migration of the version-1 flat spelling (before the groups): each flat key still works and is moved
    into its group before validation — ``rank alpha dropout target_modules`` → ``lora.*``; ``lr scheduler
    warmup_steps weight_decay max_grad_norm`` → ``optimizer.*``; ``batch_size micro_batch_size max_steps
    epochs gradient_checkpointing log_every record_samples`` → ``loop.*``; ``save_every`` →
    ``checkpoint.save_every``; ``keep_checkpoints`` → ``checkpoint.keep``. A flat key beside its grouped
    spelling wins (an old command-line override such as ``stages.recover.lr=3e-3``). ``method data dtype
    control compare_plain_steps`` kept their place. :meth:`v1_settings` gives the flat dump back, so run
    directories and checkpoints made before the groups still resume (a loss version 1 could not say is
    appended to it, so it never matches their hashes).
    """

    type: Literal["recover"]
    control: bool = Field(False, description="also give the DENSE model the same recovery and evaluate it as `control`")

    @model_validator(mode="before")
    @classmethod
    def _migrate_flat_keys(cls, data: Any) -> Any:
        return migrate_flat_keys(data)

    def v1_settings(self) -> dict[str, Any]:
        """Exactly what the flat ``RecoverConfig`` of version 1 dumped (``model_dump(mode="json")``)."""
        return flat_settings(self.model_dump(mode="json"))

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        if not any(stages[k].type in ("prune", "iterate") for k in seen):
            return ["recovery heals a pruned model: put a `prune` stage before it"]
        return []


def _env(ctx: RunContext) -> Any:
    from prunelab.stages.recovery.trainer import TrainerEnv  # lazy: torch-free

    return TrainerEnv(accelerator=ctx.accelerator, tokenizer=ctx.tokenizer, seed=ctx.recipe.seed, resume=ctx.resume,
                      progress=ctx.progress)


def run(ctx: RunContext, cfg: RecoverConfig) -> dict[str, Any]:
    from prunelab.stages.recovery.trainer import recover_model  # lazy: torch-free

    if cfg.method == "qlora" and getattr(ctx.model.config, "prunelab_layer_shapes", None):
        raise ValueError("stages.recover: method qlora needs uniform layer widths (NF4 loading builds a vanilla "
                         "model); use method: lora, or prune with allocation: uniform")
    env = _env(ctx)
    teacher = _teacher(ctx, cfg)
    generated = _generated(ctx, cfg, teacher)
    info = recover_model(env, cfg, ctx.model, ctx.stage_dir, "pruned", teacher, ctx.plan, generated)
    ctx.model = info.pop("model")
    ctx.state = "recovered"
    ctx.recover_info = {"pruned": info}
    if cfg.control:
        from prunelab.stages.io.models import load_model  # lazy: torch-free

        dense, _ = load_model(ctx.recipe.model)
        control = recover_model(env, cfg, dense, ctx.stage_dir / "control", "control", _teacher(ctx, cfg), None, generated)
        ctx.variants["control"] = control.pop("model")
        ctx.recover_info["control"] = control
    if ctx.is_main:  # the adapters' cards, in place of peft's empty template
        from prunelab.stages.recovery.model import trained_folder  # lazy: torch-free

        write_adapter_cards(ctx.stage_dir, trained_folder(cfg.method), ctx.recipe, cfg, ctx.recover_info)
    return ctx.recover_info


def _teacher(ctx: RunContext, cfg: RecoverConfig) -> Any:
    """The run's dense model, reloaded from its source, when the loss distils from it."""
    if not cfg.loss.needs_teacher:
        return None
    from prunelab.stages.io.models import load_model  # lazy: torch-free

    return load_model(ctx.recipe.model)[0]


def _generated(ctx: RunContext, cfg: RecoverConfig, teacher: Any) -> Any:
    """``data.teacher_generate``: the dense model's continuations, cached in ``teacher-generated/`` of this stage."""
    if cfg.data.teacher_generate is None:
        return None
    from prunelab.stages.io.models import load_model  # lazy: torch-free
    from prunelab.stages.recovery.generated import generate_once  # lazy: torch-free

    dense = teacher if teacher is not None else load_model(ctx.recipe.model)[0]
    return generate_once(ctx.accelerator, cfg.data, dense, ctx.tokenizer, ctx.recipe.seed,
                         ctx.stage_dir / "teacher-generated", ctx.progress)


def restore(ctx: RunContext, cfg: RecoverConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    """Re-merge the saved adapters (``full``: reload the trained weights): exact, and cheaper than merged copies."""
    from prunelab.stages.recovery.model import apply_trained, trained_folder  # lazy: torch-free

    folder = trained_folder(cfg.method)
    ctx.model = apply_trained(ctx.model, stage_dir / folder, cfg.method)
    ctx.state = "recovered"
    ctx.recover_info = dict(outputs)
    if cfg.control:
        from prunelab.stages.io.models import load_model  # lazy: torch-free

        dense, _ = load_model(ctx.recipe.model)
        ctx.variants["control"] = apply_trained(dense, stage_dir / "control" / folder, cfg.method)


register_stage("recover", RecoverConfig, run, restore)
