"""Stage: iterative pruning — ``cycles`` rounds of score → prune → recover that reach the target step by step.

Why a stage of its own, not a ``schedule`` inside prune or recover: one cycle crosses three stages (the scores
of the model the previous cycle recovered, its plan, its recovery), and stages never call each other. So this
stage holds the three settings — the prune target of the whole run (of the DENSE model, ``units: blocks`` or
``width`` as in ``prune``: ``num_blocks: 4`` in 2 cycles removes 2 + 2 blocks; width ``ratio: 0.2`` in 4 cycles leaves
95, 90, 85, 80% of the dense parameters), the criterion's settings, and every cycle's recovery — and runs the
library's functions per cycle (:mod:`prunelab.stages.iterative.cycles`). It writes ``cycle-NN/{plan.json, recover/,
done.json}`` (width: and the cycle's compensation), resumes from the last finished cycle, and leaves ``plan.json``:
the cycles' plans composed into the dense model's numbering (blocks, or each layer's heads / KV groups / MLP
channels), which metrics, report and export read. It needs a ``calibrate`` stage before it (the same windows score
every cycle) and replaces score, prune and recover (a ``recover`` after it gives a final, longer healing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from prunelab.registry import register_stage
from prunelab.stages.core.config import StrictModel
from prunelab.stages.core.files import atomic_write_json
from prunelab.stages.criteria.registry import criteria_for, kind_of, validate_settings
from prunelab.stages.criteria.scoring import PartialResults, score_criteria
from prunelab.stages.recovery.config import RecoverySettings
from prunelab.stages.iterative.cycles import Cycles, prune_settings, run_cycles, settings_key
from prunelab.stages.selection.config import BlocksSettings, WidthSettings

if TYPE_CHECKING:
    from prunelab.context import RunContext


class IterateConfig(StrictModel):
    """```yaml
    iterate:
      type: iterate
      cycles: 4                                   # 4 × (1/4 of the target)
      prune: {criterion: block_influence, ratio: 0.2}   # the WHOLE target, of the dense model (blocks), or
      # prune: {units: width, criterion: flap, ratio: 0.2, allocation: global, compensation: optimal}
      batch_size: 1                               # calibration windows per forward when scoring
      settings: {}                                # the criterion's own settings, as in `score`
      recover: {method: lora, loss: kd, data: {...}, loop: {max_steps: 50}}   # every cycle's recovery
    ```"""

    type: Literal["iterate"]
    cycles: int = Field(..., ge=1, description="prune → recover rounds; each removes its share of the target")
    prune: Annotated[BlocksSettings | WidthSettings, BeforeValidator(prune_settings)] = Field(
        ..., description="units (blocks | width), criterion and the whole target of the dense model, as in `prune`")
    batch_size: int = Field(1, ge=1, description="calibration windows per forward pass when scoring")
    settings: dict[str, Any] = Field(default_factory=dict, description="the criterion's settings, e.g. {laco: {...}}")
    recover: RecoverySettings = Field(..., description="the recovery each cycle gets (the recover stage's settings)")

    @field_validator("settings")
    @classmethod
    def _settings(cls, raw: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return validate_settings(kind_of(info.data["prune"].units), raw) if "prune" in info.data else raw

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        problems = [f"iterate prunes and recovers by itself: remove the `{stages[k].type}` stage {k!r} before it"
                    for k in seen if stages[k].type in ("prune", "iterate")]
        problems += [f"settings.{n}: this stage scores {self.prune.criterion!r} only" for n in self.settings
                     if n != self.prune.criterion]
        needs = criteria_for(self.prune.units).get(self.prune.criterion).needs or self.prune.units == "width"
        if needs and not any(stages[k].type == "calibrate" for k in seen):  # width always observes projection inputs
            problems.append(f"criterion {self.prune.criterion!r} needs calibration data; add a `calibrate` stage before it")
        return problems

    def check_model(self, num_layers: int, total_params: int | None = None, block_params: float | None = None,
                    geometries: list[Any] | None = None) -> list[str]:
        problems = self.prune.check_model(num_layers, total_params, block_params, geometries)
        if problems or getattr(self.prune, "num_blocks", None) is None or self.prune.num_blocks >= self.cycles:
            return problems
        return [f"num_blocks={self.prune.num_blocks} cannot be split over cycles={self.cycles}; lower cycles"]


def run(ctx: RunContext, cfg: IterateConfig) -> dict[str, Any]:
    from accelerate.logging import get_logger  # lazy: torch-free

    from prunelab.stages.io.models import load_model  # lazy: torch-free
    from prunelab.stages.recovery.trainer import TrainerEnv, recover_model  # lazy: torch-free

    log = get_logger(__name__)
    name, rec = cfg.prune.criterion, cfg.recover
    state = _cycles(ctx, cfg, lambda m: log.info(m, main_process_only=True))
    env = TrainerEnv(accelerator=ctx.accelerator, tokenizer=ctx.tokenizer, seed=ctx.recipe.seed, resume=ctx.resume,
                     progress=ctx.progress)
    generated = None
    if rec.data.teacher_generate is not None:
        from prunelab.stages.recovery.generated import generate_once  # lazy: torch-free

        generated = generate_once(ctx.accelerator, rec.data, load_model(ctx.recipe.model)[0], ctx.tokenizer,
                                  ctx.recipe.seed, ctx.stage_dir / "teacher-generated", ctx.progress)

    def score(model: Any, folder: Path, k: int | None, extra: set[str]) -> tuple[dict[str, Any], Any]:
        results, stats = score_criteria(kind_of(cfg.prune.units), [name], model, ctx.calibration, settings=cfg.settings,
                                        seed=ctx.recipe.seed, batch_size=cfg.batch_size, extra_needs=extra,
                                        num_remove=lambda: k, progress=ctx.progress,
                                        partial=PartialResults(folder / "partial", settings_key(state.key, k), write=ctx.is_main))
        return results[name], stats

    def recover(model: Any, out_dir: Path, label: str, plan: Any) -> dict[str, Any]:
        teacher = load_model(ctx.recipe.model)[0] if rec.loss.needs_teacher else None
        return recover_model(env, rec, model, out_dir, label, teacher, plan, generated)

    ctx.model, plan = run_cycles(state, ctx.model, score, recover)
    return _finish(ctx, state, plan)


def _cycles(ctx: RunContext, cfg: IterateConfig, log: Any) -> Any:
    keys = list(ctx.recipe.stages)
    upto = [ctx.recipe.stages[k].model_dump(mode="json") for k in keys[: keys.index(ctx.stage_key) + 1]]
    key = settings_key(ctx.recipe.model.model_dump(mode="json"), ctx.recipe.seed, upto)
    return Cycles(ctx.stage_dir, key, cfg.prune, cfg.cycles, cfg.recover.method, ctx.recipe.seed, ctx.is_main,
                  ctx.resume, log)


def _finish(ctx: RunContext, state: Any, plan: Any) -> dict[str, Any]:
    ctx.plan, ctx.state = plan, "recovered"
    ctx.model_info.update(params_after=plan.params_after, layers_after=plan.layers_after)
    infos = [r["recover"] for r in state.done]
    ctx.recover_info = {"pruned": {**infos[-1], "steps": sum(i["steps"] for i in infos), "first_loss": infos[0]["first_loss"],
                                   "seconds": round(sum(i["seconds"] for i in infos), 2), "cycles": infos}}
    if ctx.is_main:
        atomic_write_json(ctx.stage_dir / "plan.json", plan.to_json())
    return {**plan.outputs(), "cycles": [r["plan"].get("removed_blocks", r["plan"]["num_removed"]) for r in state.done],
            "final_loss": [i["final_loss"] for i in infos]}


def restore(ctx: RunContext, cfg: IterateConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    """Replay every finished cycle: its plan applied, its trained tensors merged (as the run did)."""
    state = _cycles(ctx, cfg, lambda m: None)
    state.resume = True
    missing = [c for c in range(1, cfg.cycles + 1) if state.finished(c) is None]
    if missing or json.loads((stage_dir / "plan.json").read_text())["num_removed"] != outputs["num_removed"]:
        raise FileNotFoundError(f"cycles {missing} of the finished run have no matching done.json")  # checked before
    ctx.model, plan = run_cycles(state, ctx.model, None, None)  # the model is touched: every cycle is replayed
    _finish(ctx, state, plan)


register_stage("iterate", IterateConfig, run, restore)
