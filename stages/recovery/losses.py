"""Training losses by name: ``register_loss(name, fn)``, the trainer's ``loss_step`` calls the one a recipe names.

A loss is ``fn(model, batch, teacher, settings) -> scalar tensor``: ``batch`` is the collated micro-batch
(``input_ids``, ``attention_mask``, ``labels`` with -100 on positions without loss), ``teacher`` the frozen
model a distillation loss compares against (None for losses that declare no teacher) and ``settings`` the
recipe's ``loss`` group (:class:`prunelab.stages.recovery.config.LossSettings`; None means its defaults). The value is
the mean over the micro-batch's labelled positions; the trainer divides by the accumulation itself.

Registered: ``ce`` (next-token cross-entropy), ``kd`` (forward KL from the teacher's logits) and ``ce+kd``
(their mix, torchtune's ``kd_ratio``); both distillation losses may add ``intermediate``, a distance between
the teacher's block outputs and the student's kept blocks (:func:`block_pairs` reads the mapping from the plan).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from prunelab.stages.core.registry import register_variant
from prunelab.stages.recovery.config import LOSSES, LossSettings

if TYPE_CHECKING:
    import torch

LossFn = Callable[..., "torch.Tensor"]
IGNORE = -100


@dataclass(frozen=True)
class Loss:
    name: str
    fn: LossFn
    needs_teacher: bool = False  # the trainer must hand it the dense model


def register_loss(name: str, fn: LossFn, needs_teacher: bool = False, settings: type[BaseModel] = LossSettings) -> Loss:
    """Register ``fn`` under ``name`` in :data:`LOSSES` (``loss: name`` in a recipe then validates), with its settings
    class (default: :class:`LossSettings`, whose KD fields a distillation loss may read); a name registered twice is
    an error (two losses fighting over it)."""
    loss = Loss(name, fn, needs_teacher)
    register_variant(LOSSES, settings, loss, name=name)
    return loss


def get_loss(name: str) -> Loss:
    loss: Loss = LOSSES.impl(name)
    return loss


class Teacher:
    """The frozen dense model: eval mode, no gradients, called on the student's very micro-batch.

    ``pairs``: (student, teacher) indices into ``hidden_states`` whose block outputs the intermediate loss
    compares (:func:`block_pairs`). It keeps the seconds its forwards took, so the trainer can report tokens/s
    with and without it."""

    def __init__(self, model: Any, pairs: list[tuple[int, int]] | None = None) -> None:
        model.eval()  # a DeepSpeed engine's eval() returns None: not chained
        model.requires_grad_(False)
        self.model = model
        self.pairs = pairs
        self.seconds = 0.0
        self.sharded = False  # ZeRO-3: each rank holds a shard of its weights

    def forward(self, batch: dict[str, torch.Tensor], hidden: bool = False) -> Any:
        import torch  # lazy: torch-free

        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
        self.seconds += time.perf_counter() - t0
        return out

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(batch).logits


def block_pairs(plan: Any, teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
    """Which student block output is compared with which teacher block output, as indices into transformers'
    ``hidden_states`` (index i + 1 = the output of block i; the last index is AFTER the final norm).

    Depth plan: student block j ↔ teacher block kept[j] (the teacher's blocks the plan did not remove; a LaCo
    merge is paired with the block it was merged into). Width plan: block j ↔ block j (the hidden size is
    unchanged). No plan (the dense control): identity. A pair where only one side is the model's last block is
    left out, since only that side has passed the final norm. A hidden-channel plan changes the hidden size, so
    there is nothing to compare without a projection: an error."""
    kind = getattr(plan, "kind", None)
    if kind == "hidden":
        raise ValueError("loss.intermediate compares block outputs of equal width; a hidden-channel plan changes the "
                         "width: leave intermediate out")
    removed = set(getattr(plan, "removed_blocks", None) or []) if kind == "depth" else set()
    kept = [i for i in range(teacher_layers) if i not in removed]
    if len(kept) != student_layers:
        raise ValueError(f"the plan keeps {len(kept)} of the teacher's {teacher_layers} blocks but the student has "
                         f"{student_layers}")
    last_s, last_t = student_layers - 1, teacher_layers - 1
    return [(j + 1, t + 1) for j, t in enumerate(kept) if (j == last_s) == (t == last_t)]


def block_distance(student: tuple, teacher: tuple, pairs: list[tuple[int, int]], mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over pairs of: cosine — mean (1 − cos) over the masked positions; mse — mean squared error over their
    elements. Computed in float32."""
    import torch.nn.functional as F  # lazy: torch-free

    terms = []
    for s_idx, t_idx in pairs:
        s, t = student[s_idx][mask].float(), teacher[t_idx][mask].float()
        terms.append((1 - F.cosine_similarity(s, t, dim=-1)).mean() if kind == "cosine" else F.mse_loss(s, t))
    return sum(terms) / len(terms)


def next_token_ce(model: Any, batch: dict[str, torch.Tensor], teacher: Any = None, settings: Any = None) -> torch.Tensor:
    """Next-token cross-entropy as transformers computes it from ``labels`` (shifted, mean over labelled tokens)."""
    return model(**batch).loss


def kd_divergence(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                  top_k: int = 0) -> torch.Tensor:
    """Forward KL of the student's next-token distribution from the teacher's, mean over labelled positions.

    Per position, KL(softmax(t/T) ‖ softmax(s/T))·T² = T²·Σ_v p_t(v)·(log p_t(v) − log p_s(v)), as NVIDIA
    Model-Optimizer's ``LogitsDistillationLoss`` (``modelopt.torch.distill.losses``; the Minitron recipe,
    ``examples/llm_distill``); the T² keeps gradient sizes independent of T (Hinton et al. 2015).

    ``top_k > 0``: K = the indices of the teacher's k largest logits at that position; both distributions are
    renormalised over K — p_t = softmax(t_K/T), p_s = softmax(s_K/T) — and the sum runs over K only. The
    student's mass outside K is therefore not constrained (the price of storing k logits instead of V).

    Logits at position i predict token i+1, so position i counts when ``labels[i+1] != -100`` (exactly the
    positions transformers' shifted cross-entropy counts). Computed in float32.
    """
    import torch.nn.functional as F  # lazy: torch-free

    s, t = student[:, :-1].float(), teacher[:, :-1].float()
    mask = labels[:, 1:] != IGNORE
    s, t = s[mask], t[mask]  # (positions, vocab)
    if top_k and top_k < t.shape[-1]:
        t, idx = t.topk(top_k, dim=-1)
        s = s.gather(-1, idx)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    per_position = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if per_position.numel() == 0:
        return student.sum() * 0.0  # no labelled position: a zero that still has a graph
    return per_position.mean() * temperature**2


def _kd_terms(model: Any, batch: dict[str, torch.Tensor], teacher: Teacher, settings: Any, with_ce: bool) -> tuple:
    """(kd, intermediate weight × block distance (0 without intermediate), ce or None, settings) of a micro-batch."""
    settings = settings or LossSettings(type="kd")
    teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher)
    inter = settings.intermediate
    inputs = batch if with_ce else {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, output_hidden_states=inter is not None)
    t_out = teacher.forward(batch, hidden=inter is not None)
    kd = kd_divergence(out.logits, t_out.logits, batch["labels"], settings.temperature, settings.top_k)
    blocks = 0.0
    if inter is not None:
        if not teacher.pairs:
            raise ValueError("loss.intermediate needs the block mapping (Teacher.pairs, from the plan)")
        mask = batch["labels"][:, 1:] != IGNORE  # the positions KD counts: those whose next token has a label
        states = [tuple(h[:, :-1] for h in o.hidden_states) for o in (out, t_out)]
        blocks = inter.weight * block_distance(*states, teacher.pairs, mask, inter.kind)
    return kd, blocks, (out.loss if with_ce else None), settings


def distill_kd(model: Any, batch: dict[str, torch.Tensor], teacher: Teacher, settings: Any = None) -> torch.Tensor:
    """``kd``: the student learns the teacher's distributions only (no LM loss), as in Minitron; plus
    ``intermediate.weight`` × the block-output distance when ``intermediate`` is set."""
    kd, blocks, _, _ = _kd_terms(model, batch, teacher, settings, with_ce=False)
    return kd + blocks


def distill_ce_kd(model: Any, batch: dict[str, torch.Tensor], teacher: Teacher, settings: Any = None) -> torch.Tensor:
    """``ce+kd``: (1 − r)·ce + r·kd with r = ``kd_ratio``, torchtune's knowledge-distillation recipes
    (``recipes/knowledge_distillation_single_device.py``: ``(1 - kd_ratio) * class_loss + kd_ratio * kd_loss``);
    plus ``intermediate.weight`` × the block-output distance when ``intermediate`` is set (not scaled by r)."""
    kd, blocks, ce, settings = _kd_terms(model, batch, teacher, settings, with_ce=True)
    r = settings.kd_ratio
    return (1.0 - r) * ce + r * kd + blocks


# The built-in losses, registered in stages.recovery.config (torch-free validation) by these names.
CE = Loss("ce", next_token_ce)
KD = Loss("kd", distill_kd, needs_teacher=True)
CE_KD = Loss("ce+kd", distill_ce_kd, needs_teacher=True)
