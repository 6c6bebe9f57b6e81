"""The criterion interface, the same for depth and width: ``score_fn(CriterionInputs) -> CriterionResult``.

Torch-free at import (tensors appear only in annotations), so the registry and recipe validation can name it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from prunelab.stages.arch import adapter_for

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

    from prunelab.stages.arch.base import ArchAdapter
    from prunelab.stages.calibration.stats import CalibrationStats


@dataclass
class CriterionInputs:
    """Everything a criterion may read. Criteria must not modify the model."""

    model: torch.nn.Module
    stats: CalibrationStats
    seed: int = 0
    settings: BaseModel | None = None  # the criterion's own settings (its registered model), None for its defaults
    calibration: torch.Tensor | None = None  # for criteria that run their own passes (SLEB's rounds, LaCo)
    batch_size: int = 1
    num_remove: int | None = None  # iterative criteria stop at the later prune stage's target
    progress: bool = True
    prune: Any = None  # the later prune stage's settings: sublayer_sleb stops at its `units: sublayers` target
    pipeline: Any = None  # the calibration pipeline those passes go through (None: full); SLEB's rounds honour it

    @cached_property
    def adapter(self) -> ArchAdapter:
        return adapter_for(self.model)


@dataclass
class CriterionResult:
    """One criterion's scores. Higher = more important (kept longer).

    depth: ``scores`` per block (``inf`` = protected); optionally a removal ``order`` (iterative criteria),
    ``windows`` (distance of every window of n consecutive blocks, for every n) and ``protected`` blocks.
    width: ``layers`` — per layer ``{"q_heads": [n_q], "kv_groups": [n_kv], "mlp": [intermediate]}`` — and,
    when the later prune stage removes hidden channels and the criterion defines them, ``hidden`` [hidden_size].
    ``extra`` holds criterion-specific details (SLEB's rounds, LaCo's merges, ...), saved beside the scores.
    """

    kind: Literal["depth", "width"] = "depth"
    scores: list[float] | None = None
    order: list[int] | None = None
    windows: dict[int, list[float]] | None = None
    protected: list[int] = field(default_factory=list)
    layers: list[dict[str, list[float]]] | None = None
    hidden: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    paper: str = ""
    seconds: float | None = None

    def __post_init__(self) -> None:
        missing = "scores" if self.kind == "depth" and self.scores is None else \
            "layers" if self.kind == "width" and self.layers is None else None
        if missing:
            raise ValueError(f"a {self.kind} criterion result needs `{missing}`")

    def to_json(self) -> dict[str, Any]:
        """What ``scores.json`` and ``partial/<criterion>.json`` hold and selection reads (the version-1 layout)."""
        out: dict[str, Any]
        if self.kind == "width":
            out = {"units": "width", "layers": self.layers}
            if self.hidden is not None:
                out["hidden"] = self.hidden
        else:
            out = {"scores": [None if math.isinf(s) else s for s in self.scores or []]}
            if self.order is not None:
                out["order"] = self.order
            if self.windows is not None:
                out["windows"] = {str(k): v for k, v in self.windows.items()}
            out["protected"] = self.protected
        out.update(self.extra)
        if self.paper:
            out["paper"] = self.paper
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out
