"""Recovery settings, grouped as a reader looks for them: the adapter (``lora``), the optimizer and its
schedule (``optimizer``), the training loop (``loop``), checkpoints (``checkpoint``); what is none of those
(method, loss, data, dtype) sits at the top. Torch-free: recipes validate without importing torch.

The trainer types against :class:`RecoverySettings`; the recover stage's ``RecoverConfig`` adds its own
fields (``type``, ``control``) and the migration of the version-1 flat spelling, whose table is here
(:data:`FLAT_KEYS`, :data:`V1_ORDER`) beside the groups it maps into.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_serializer, model_validator

from prunelab.stages.arch import lora_target_choices
from prunelab.stages.arch.base_names import HEAD_NAME, LORA_TARGETS
from prunelab.stages.calibration.sources import SamplingSettings
from prunelab.stages.core.config import StrictModel
from prunelab.stages.core.registry import VariantRegistry, register_variant, tagged_union
from prunelab.stages.io.config import TextSource
from prunelab.stages.recovery.trackers import tracker_problems

DECODER_LINEARS = list(LORA_TARGETS)  # the architecture adapters' LoRA target modules


class TeacherGenerate(SamplingSettings):
    """Text the dense teacher writes from prompts drawn from the data's ``source``: ``num_samples`` prompts of
    ``prompt_tokens`` tokens (seeded windows of the source) continued to ``seq_len`` tokens by seeded sampling
    (``prunelab.stages.calibration.generate``), cached shard by shard in the recover stage's folder. Distillation needs
    no labels, so this widens the data beyond the source; with ``ce`` it is sequence-level distillation."""

    num_samples: int = Field(..., ge=1, description="generated sequences (each one training block of seq_len tokens)")
    prompt_tokens: int = Field(32, ge=1, description="tokens of the source that start each sequence")
    with_source: bool = Field(True, description="also train on the source's own blocks (false: the generated text alone)")


class RecoveryData(StrictModel):
    source: TextSource = Field(..., description="training text (valid/train splits, never test) or instruction rows")
    format: Literal["text", "alpaca"] = Field(
        "text", description="text: packed language modelling; alpaca: instruction/input/output rows, loss on the response"
    )
    seq_len: int = Field(256, ge=8, description="text: tokens per packed block; alpaca: cutoff length (LLM-Pruner: 256)")
    max_samples: int | None = Field(None, ge=1, description="use only the first N blocks / rows")
    train_on_inputs: bool = Field(False, description="alpaca: also put loss on the prompt tokens")
    shuffle: bool = Field(True, description="seeded shuffle per epoch (the same order on every rank)")
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"teacher_generate": None}  # added later: left out of dumps at its default
    teacher_generate: TeacherGenerate | None = Field(
        None, description="format text: add continuations the dense model samples from prompts drawn from `source`")

    @model_validator(mode="after")
    def _generate_text(self) -> RecoveryData:
        if self.teacher_generate is not None and self.format != "text":
            raise ValueError("teacher_generate continues windows of plain text: use format: text")
        if self.teacher_generate is not None and self.teacher_generate.prompt_tokens >= self.seq_len:
            raise ValueError(f"teacher_generate.prompt_tokens={self.teacher_generate.prompt_tokens} leaves nothing to "
                             f"generate at seq_len={self.seq_len}; lower it")
        return self



class LoraSettings(StrictModel):
    """The adapter (peft ``LoraConfig``); used by methods lora and qlora."""

    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DECODER_LINEARS), description="default: every decoder linear")

    @field_validator("target_modules")
    @classmethod
    def _known(cls, modules: list[str]) -> list[str]:
        unknown = [m for m in modules if m not in lora_target_choices()]
        if unknown:
            raise ValueError(f"target_modules {unknown}: choose from {', '.join(DECODER_LINEARS)} (or {HEAD_NAME})")
        return modules


class OptimizerSettings(StrictModel):
    """AdamW and its learning-rate schedule, stepped once per optimizer step."""

    lr: float = Field(1e-4, gt=0)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip gradients (None: off)")


class LoopSettings(StrictModel):
    """How many steps, of how many samples, computed how, and what the loop records."""

    batch_size: int = Field(64, ge=1, description="GLOBAL batch per optimizer step = micro_batch_size × accumulation × processes")
    micro_batch_size: int = Field(4, ge=1, description="samples per forward on each process")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% slower")
    log_every: int = Field(10, ge=1)
    record_samples: bool = Field(True, description="write the sample indices each rank consumed (samples.json)")
    divergence_factor: float | None = Field(
        3.0, gt=1, description="stop when a step's loss exceeds this × the first loss after warm-up (a NaN/Inf loss or "
        "weight always stops); None: only non-finite values stop")

    log_with: list[str] = Field(
        [], description="accelerate trackers that receive the loss and learning rate every step (tensorboard, "
        "wandb, mlflow, comet_ml, aim, clearml, dvclive, …; the tracker's own package must be installed); logs go "
        "under <run dir>/trackers/")
    # added later: left out of dumps at their defaults
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"divergence_factor": 3.0, "log_with": []}

    @field_validator("log_with")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        """A tracker name accelerate knows, whose package is importable: checked here, not after the model loads."""
        problems = tracker_problems(v)
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _sizes(self) -> LoopSettings:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}")
        return self


class CheckpointSettings(StrictModel):
    """``accelerator.save_state`` every N optimizer steps, so ``--resume`` continues a killed training."""

    save_every: int | None = Field(None, ge=1, description="checkpoint every N optimizer steps (None: never)")
    keep: int = Field(2, ge=1, description="newest checkpoints kept on disk")


class IntermediateLoss(StrictModel):
    """A distance between the teacher's block outputs and the student's kept blocks (the mapping from the plan)."""

    weight: float = Field(1.0, gt=0, description="added to the loss as weight × distance")
    kind: Literal["cosine", "mse"] = Field("cosine", description="cosine: mean (1 − cos) per token; mse: mean squared error")


KD_KEYS = ("temperature", "top_k", "intermediate", "teacher_cache")


class LossBase(StrictModel):
    """The base of every loss's settings: ``type`` names a loss registered in :data:`LOSSES`."""

    type: str

    @property
    def needs_teacher(self) -> bool:
        """Whether the trainer must load the dense teacher (the registered ``Loss`` says)."""
        return bool(LOSSES.impl(self.type).needs_teacher)


# Every recovery loss by name: its settings class and its ``Loss`` (``prunelab.stages.recovery.losses``: the function
# and whether it needs the teacher), imported when the trainer asks. ``losses.register_loss`` adds one.
LOSSES = VariantRegistry("recovery loss", base=LossBase)


class LossSettings(LossBase):
    """What the student is trained to match. ``loss: kd`` is short for ``loss: {type: kd}``.

    - ``ce``: next-token cross-entropy on the data's labels;
    - ``kd``: forward KL from the dense teacher's logits, KL(softmax(t/T) ‖ softmax(s/T))·T² (Model-Optimizer's
      ``LogitsDistillationLoss``), optionally over the teacher's ``top_k`` logits only;
    - ``ce+kd``: (1 − kd_ratio)·ce + kd_ratio·kd (torchtune's knowledge-distillation recipes).
    Only positions with a label count (labels != -100), so Alpaca response-only masking applies to KD too."""

    type: str = Field("ce", description="a registered loss: ce | kd | ce+kd (stages.recovery.losses.register_loss adds one)")
    temperature: float = Field(1.0, gt=0, description="kd: softmax temperature T (the loss is scaled by T²)")
    top_k: int = Field(0, ge=0, description="kd: 0 = the whole vocabulary; k = the teacher's k largest logits per "
                       "position, both distributions renormalised over that set")
    kd_ratio: float = Field(0.5, ge=0, le=1, description="ce+kd: loss = (1 − kd_ratio)·ce + kd_ratio·kd")
    intermediate: IntermediateLoss | None = Field(None, description="kd, ce+kd: also match the teacher's block outputs "
                                                  "(student block j ↔ teacher block kept[j] of a depth plan)")
    teacher_cache: bool = Field(False, description="kd, ce+kd: write the teacher's top_k logits of every sample to disk "
                                "in one pass before training and read them back (the teacher is freed for training)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    @field_validator("type")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(f"loss {v!r}: choose {LOSSES.choices()}")
        return v

    @model_validator(mode="after")
    def _applies(self) -> LossSettings:
        given = self.model_fields_set
        if self.type == "ce" and given & set(KD_KEYS + ("kd_ratio",)):
            raise ValueError(f"{sorted(given & set(KD_KEYS + ('kd_ratio',)))} apply to type kd or ce+kd, not ce")
        if self.type == "kd" and "kd_ratio" in given:
            raise ValueError("kd_ratio mixes ce and kd: it applies to type ce+kd only")
        if self.teacher_cache and (not self.top_k or self.intermediate is not None):
            raise ValueError("teacher_cache stores the teacher's top-k logits only: set top_k > 0 (e.g. 64) and leave "
                             "intermediate out")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        """Only the settings that apply, so a dump validates again; ``ce`` dumps as the string it was before the
        group, so the settings hashes of ``ce`` runs did not move."""
        if self.type == "ce":
            return "ce"
        out = handler(self)
        if self.type == "kd":
            out.pop("kd_ratio", None)
        if self.intermediate is None:
            out.pop("intermediate", None)
        if not self.teacher_cache:
            out.pop("teacher_cache", None)
        return out


for _name, _loss in (("ce", "CE"), ("kd", "KD"), ("ce+kd", "CE_KD")):
    register_variant(LOSSES, LossSettings, f"prunelab.stages.recovery.losses:{_loss}", name=_name)
Loss = tagged_union(LOSSES)


class RecoverySettings(StrictModel):
    """Everything the trainer reads. Loss names are those of :mod:`prunelab.stages.recovery.losses`."""

    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora: an adapter on the frozen pruned weights; qlora: the same on NF4 base weights "
        "(bitsandbytes); full: every weight of the pruned model trains (no adapter)")
    loss: Loss = Field(default_factory=LossSettings, description="a registered loss (ce | kd | ce+kd), or "
                       "{type, temperature, ...}")
    data: RecoveryData
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype of the frozen base while training; auto = bfloat16 where the GPU has it "
        "(fp16 recovery of Llama-2 hit NaN losses in LLM-Pruner), else float32"
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    loop: LoopSettings = Field(default_factory=LoopSettings)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings)
    compare_plain_steps: int = Field(0, ge=0, description="time N steps of a plain peft loop (no accelerate) on the "
                                     "same batches, in the same process, for the tokens/s comparison")

    def accumulation(self, num_processes: int) -> int:
        """Micro-batches per process per optimizer step, so that the GLOBAL batch is the recipe's."""
        loop = self.loop
        per_step = loop.micro_batch_size * num_processes
        if loop.batch_size % per_step:
            raise ValueError(
                f"stages.recover: loop.batch_size={loop.batch_size} is not divisible by micro_batch_size × processes "
                f"= {loop.micro_batch_size} × {num_processes}; change loop.batch_size or loop.micro_batch_size"
            )
        return loop.batch_size // per_step


# ----------------------------------------------------------------------------- the version-1 flat spelling
GROUPS: dict[str, type[BaseModel]] = {
    "lora": LoraSettings, "optimizer": OptimizerSettings, "loop": LoopSettings, "checkpoint": CheckpointSettings,
    "loss": LossSettings,
}
# Every key of the flat schema (commit 0f1500b) that moved into a group: old key → (group, new key).
FLAT_KEYS: dict[str, tuple[str, str]] = {
    **{k: ("lora", k) for k in ("rank", "alpha", "dropout", "target_modules")},
    **{k: ("optimizer", k) for k in ("lr", "scheduler", "warmup_steps", "weight_decay", "max_grad_norm")},
    **{k: ("loop", k) for k in ("batch_size", "micro_batch_size", "max_steps", "epochs", "gradient_checkpointing",
                                "log_every", "record_samples")},
    "save_every": ("checkpoint", "save_every"),
    "keep_checkpoints": ("checkpoint", "keep"),
}
# The flat schema's fields in its order (``model_dump`` of version 1); the others kept their names at the top.
V1_ORDER = ("type", "method", "rank", "alpha", "dropout", "target_modules", "data", "batch_size", "micro_batch_size",
            "max_steps", "epochs", "lr", "scheduler", "warmup_steps", "weight_decay", "max_grad_norm",
            "gradient_checkpointing", "dtype", "save_every", "keep_checkpoints", "log_every", "control",
            "compare_plain_steps", "record_samples")


def migrate_flat_keys(raw: Any) -> Any:
    """Move each flat key into its group (``lr`` → ``optimizer.lr``, ``keep_checkpoints`` → ``checkpoint.keep``).

    A flat key given beside the grouped one wins: that is how an old-spelling command-line override
    (``stages.recover.lr=3e-3``) of a grouped recipe arrives. A key written in the wrong group is an error
    naming the group it belongs to."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for old, (group, key) in FLAT_KEYS.items():
        if old not in out:
            continue
        section = out.get(group)
        if isinstance(section, BaseModel):
            section = section.model_dump()
        elif section is None:
            section = {}
        elif not isinstance(section, dict):
            continue  # not a mapping: pydantic reports the group's type
        section = {**section, key: out.pop(old)}
        out[group] = section
    problems = [_misplaced(group, key) for group, section in out.items() if group in GROUPS and isinstance(section, dict)
                for key in section if key not in GROUPS[group].model_fields]
    problems += [f"{key}: `{key}` is a loss setting; write loss.{key} (and loss.type: kd or ce+kd)"
                 for key in out if key in LossSettings.model_fields and key != "type"]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("; ".join(problems))
    return out


def _misplaced(group: str, key: str) -> str | None:
    """``optimizer.batch_size`` → where it belongs; unknown keys are left to ``extra="forbid"``."""
    home = FLAT_KEYS.get(key)
    if home is None and key in LossSettings.model_fields and group != "loss" and key != "type":
        return f"{group}.{key}: `{key}` does not belong in `{group}`; write loss.{key}"
    if home is None and key in RecoverySettings.model_fields:
        return f"{group}.{key}: `{key}` does not belong in `{group}`; write it at the top of the stage, beside method"
    if home is None:
        return None
    return f"{group}.{key}: `{key}` does not belong in `{group}`; write {home[0]}.{home[1]}"


# Settings version 1 could not say, with the value that means "as version 1 did".
V1_ABSENT = {"loss": "ce"}


def flat_settings(dump: dict[str, Any]) -> dict[str, Any]:
    """A grouped ``model_dump(mode="json")`` in the version-1 flat shape, field for field and in order.

    Settings version 1 could not say (a distillation loss, ``method: full``) are appended after the old keys,
    so such settings never share a hash with a version-1 run directory or checkpoint."""
    out = {old: dump[FLAT_KEYS[old][0]][FLAT_KEYS[old][1]] if old in FLAT_KEYS else dump[old] for old in V1_ORDER}
    out.update({key: dump[key] for key, v1 in V1_ABSENT.items() if dump.get(key, v1) != v1})
    return out
