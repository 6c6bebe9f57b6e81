"""The width plan of ``propagate: pruned``: decided on dense scores (pass 1), compensated on the pruned path (pass 2).

Every global decision — FLAP's global allocation, OWL / AlphaPruning ratios, the engines' constraints — needs all
the blocks' scores, so the plan (which units each layer keeps) is made exactly as with ``propagate: dense``, from
the same scores; only the compensation is re-fitted, block by block, on the outputs of the already-pruned blocks
(``prunelab.stages.surgery.propagated``). The plan is therefore the dense plan; its side tensors differ.
"""

from __future__ import annotations

from typing import Any

from prunelab.stages.calibration.pipelines import propagation_refusal
from prunelab.stages.selection.config import WidthSettings
from prunelab.stages.selection.planning import make_width_plan
from prunelab.stages.surgery.plan import WidthPlan
from prunelab.stages.surgery.targets import NoCompensation


def propagated_width_plan(result: dict[str, Any], cfg: WidthSettings, model: Any, stats: dict[str, Any] | None,
                          results: dict[str, Any] | None, calibration: Any, pipeline: Any, batch_size: int = 1,
                          progress: bool = True) -> tuple[WidthPlan, dict[str, Any]]:
    """(plan, side tensors): the plan of ``make_width_plan`` without its compensation, then the recipe's compensation
    fitted by ``propagated_compensation`` with the pipeline's target, memory budget and offload folder."""
    from prunelab.stages.surgery.propagated import propagated_compensation  # lazy: torch-free

    refusal = propagation_refusal(pipeline, cfg)
    if refusal:
        raise ValueError(refusal)
    if getattr(model, "prunelab_weights", None) is not None:  # stages.io.streaming: compensation happens at export
        raise ValueError("propagate: pruned with model.load: streaming is not built (a streamed run compensates each "
                         "block at export, on the dense inputs); use propagate: dense, or a resident model")
    plan, _ = make_width_plan(result, cfg.model_copy(update={"compensation": NoCompensation()}), model, stats, results,
                              calibration)
    plan.target = plan.target.model_copy(update={"compensation": cfg.compensation})
    layers = {int(k): v.model_dump() for k, v in plan.layers.items()}
    side = propagated_compensation(model, calibration, layers, cfg.compensation, pipeline.target, batch_size, progress,
                                   pipeline)
    plan.side_file = "compensation.safetensors" if side else None
    return plan, side


def score_batch_size(key: str, stages: dict[str, Any]) -> int:
    """The batch size of the last width score stage before ``key`` (pass 2 drives the windows as pass 1 did)."""
    keys = list(stages)
    scorers = [stages[k] for k in keys[: keys.index(key)] if getattr(stages[k], "type", None) == "score"
               and getattr(stages[k], "units", None) == "width"]
    return scorers[-1].batch_size if scorers else 1
