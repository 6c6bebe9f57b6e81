"""The one object every stage reads and writes: the model in memory and what later stages need from earlier ones.

Only state that crosses stages lives here, each field typed and documented; what one stage keeps for itself
lives in its own folder (``ctx.stage_dir``) and is reloaded by its ``restore``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunelab.stages.arch import adapter_for

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn

    from prunelab.recipe import RecipeBase
    from prunelab.stages.arch.base import ArchAdapter
    from prunelab.stages.surgery.plan import Plan


@dataclass
class RunContext:
    recipe: RecipeBase
    run_dir: Path
    accelerator: Accelerator | None = None
    progress: bool = True
    resume: bool = False  # --resume: stages may continue from their own checkpoints
    # ---- the model, and its state along the run: dense → pruned → recovered
    model: nn.Module | None = None
    tokenizer: Any = None
    state: str = "dense"
    model_info: dict[str, Any] = field(default_factory=dict)  # source, params/layers before and after
    # ---- what stages hand to later stages
    calibration: Any = None  # LongTensor [num_samples, seq_len] (calibrate → score, prune, recover)
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # criterion → saved result (score → prune)
    activation_stats: dict[str, Any] | None = None  # per-layer input summaries for compensation/allocation (score → prune)
    plan: Plan | None = None  # the applied plan (prune → evaluate, export, report)
    variants: dict[str, nn.Module] = field(default_factory=dict)  # other models to evaluate by label, e.g. "control"
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # label → dataset → result (evaluate → export)
    recover_info: dict[str, Any] = field(default_factory=dict)  # label → training stats (recover → metrics)
    exported: dict[str, Any] = field(default_factory=dict)  # what export wrote (path, reload difference)
    timings: dict[str, float] = field(default_factory=dict)
    # ---- where the runner is
    stage_key: str = ""
    stage_dir: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def adapter(self) -> ArchAdapter:
        return adapter_for(self.model)

    def later_stages(self) -> list[tuple[str, Any]]:
        """Stages after the current one, in recipe order."""
        keys = list(self.recipe.stages)
        idx = keys.index(self.stage_key) if self.stage_key in keys else -1
        return [(k, self.recipe.stages[k]) for k in keys[idx + 1 :]]
