"""Training losses by name: ``register_loss(name, fn)``, the trainer's ``loss_step`` calls the one a recipe names.

A loss is ``fn(model, batch, teacher) -> scalar tensor``: ``batch`` is the collated micro-batch
(``input_ids``, ``attention_mask``, ``labels`` with -100 on positions without loss) and ``teacher`` the
frozen model a distillation loss compares against (None for losses that declare no teacher). The
value is the mean over the micro-batch; the trainer divides by the accumulation itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.core.registry import Registry

if TYPE_CHECKING:
    import torch

LossFn = Callable[[Any, dict[str, "torch.Tensor"], Any], "torch.Tensor"]


@dataclass(frozen=True)
class Loss:
    name: str
    fn: LossFn
    needs_teacher: bool = False  # the trainer must hand it the dense model


LOSSES: Registry[Loss] = Registry("recovery loss")


def register_loss(name: str, fn: LossFn, needs_teacher: bool = False) -> Loss:
    """Register ``fn`` under ``name``; a name registered twice is an error (two losses fighting over it)."""
    return LOSSES.register(name, Loss(name, fn, needs_teacher))


def get_loss(name: str) -> Loss:
    return LOSSES.get(name)


def next_token_ce(model: Any, batch: dict[str, torch.Tensor], teacher: Any = None) -> torch.Tensor:
    """Next-token cross-entropy as transformers computes it from ``labels`` (shifted, mean over labelled tokens)."""
    return model(**batch).loss


register_loss("ce", next_token_ce)
