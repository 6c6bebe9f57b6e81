"""The one object every stage reads and writes: model, tokenizer, data, results so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.recipe import RecipeBase


@dataclass
class RunContext:
    recipe: RecipeBase
    run_dir: Path
    accelerator: Any = None
    progress: bool = True
    model: Any = None
    tokenizer: Any = None
    calibration: Any = None  # LongTensor [num_samples, seq_len]
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # criterion → result json
    score_seconds: dict[str, float] = field(default_factory=dict)
    width_means: dict[str, Any] | None = None  # per layer o_proj / down_proj input means (FLAP bias)
    plan: dict[str, Any] | None = None
    state: str = "dense"  # dense → pruned → recovered
    model_info: dict[str, Any] = field(default_factory=dict)
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # label → dataset → result
    timings: dict[str, float] = field(default_factory=dict)
    resume: bool = False  # --resume: stages may continue from their own checkpoints
    recover_info: dict[str, Any] = field(default_factory=dict)  # label → training stats (steps, loss, tokens/s)
    control_model: Any = None  # the dense model given the same recovery (evaluated as `control`)
    stage_key: str = ""
    stage_dir: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def adapter(self) -> Any:
        from stages.arch.llama import adapter_for

        return adapter_for(self.model)

    def later_stages(self) -> list[tuple[str, Any]]:
        """Stages after the current one, in recipe order."""
        keys = list(self.recipe.stages)
        idx = keys.index(self.stage_key) if self.stage_key in keys else -1
        return [(k, self.recipe.stages[k]) for k in keys[idx + 1 :]]
