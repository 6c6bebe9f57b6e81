"""Width cycles of the ``iterate`` stage: each cycle's parameter goal, its selection, and the cycles' plans composed
into the dense model's numbering.

**The target rule.** ``ratio`` is of the DENSE model's parameters (``P₀``, counted as the prune stage counts them,
embeddings included). After cycle ``c`` of ``C`` the model should hold ``goal(c) = P₀ − round(ratio · c/C · P₀)``
parameters, so each cycle removes ``P_{c−1} − goal(c)`` of what its input (the previous cycle's recovered model)
holds: its selection gets ``ratio_c = (P_{c−1} − goal(c)) / P_{c−1}`` of its input, with the width settings of the
recipe (allocation, attention unit, layers, compensation) unchanged. A cycle that over- or undershoots by rounding
(whole heads, KV groups, channels) is corrected by the next one, so the last cycle ends nearest ``P₀ · (1 − ratio)``,
as the one-shot plan does.

Each cycle collects the statistics its criterion needs (and the projection inputs; XᵀX for optimal compensation) on
the current model from the run's calibration windows, selects (:func:`prunelab.stages.selection.planning.make_width_plan`)
and returns the plan with its compensation side tensors; surgery and recovery are the loop's
(:mod:`prunelab.stages.iterative.cycles`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunelab.stages.arch import adapter_for
from prunelab.stages.selection.config import WidthSettings
from prunelab.stages.selection.planning import make_width_plan
from prunelab.stages.selection.targets import ratio_to_params
from prunelab.stages.surgery.plan import LayerRemoval, WidthPlan

UNIT_KINDS = ("q_heads", "kv_heads", "mlp")


def cycle_goal(dense: int, ratio: float, c: int, cycles: int) -> int:
    """Parameters the model holds after cycle ``c`` of ``cycles``: the dense count less ``c/cycles`` of the target."""
    return dense - ratio_to_params(ratio * c / cycles, dense)


class WidthSchedule:
    """Width pruning over ``cycles``: ``select`` scores and plans one cycle, ``compose`` maps the plans to the dense model."""

    def __init__(self, prune: WidthSettings, cycles: int, model: Any) -> None:
        if prune.ratio is None:
            raise ValueError("iterate's width target is `ratio` (of the dense model's parameters), not layer_ratio")
        self.prune, self.cycles = prune, cycles
        self.dense = adapter_for(model).total_params()

    def select(self, model: Any, c: int, folder: Path, score: Callable[..., tuple[dict[str, Any], Any]]) -> tuple[WidthPlan, dict[str, Any]]:
        """Cycle ``c``'s plan (indices of ``model`` as it is) and side tensors: ``score(model, folder, None, extra)``
        gives the criterion's result and the calibration statistics of ``model``."""
        from prunelab.stages.calibration.width import summary_tensors  # lazy: torch-free
        from prunelab.stages.selection.width import WidthTargetError  # lazy: torch-free

        current, goal = adapter_for(model).total_params(), cycle_goal(self.dense, self.prune.ratio, c, self.cycles)
        where = f"cycle {c} of {self.cycles} (goal {goal:,} of the dense model's {self.dense:,} parameters; the model has {current:,})"
        if current <= goal:
            raise WidthTargetError(f"{where}: nothing left to remove; lower cycles or raise ratio")
        result, stats = score(model, folder, None, {"hessian"} if self.prune.compensation.type == "optimal" else set())
        cfg = self.prune.model_copy(update={"ratio": (current - goal) / current})
        try:
            return make_width_plan(result, cfg, model, summary_tensors(stats))
        except WidthTargetError as exc:
            raise WidthTargetError(f"{where}: {exc}; lower cycles or raise ratio") from None

    def compose(self, plans: list[WidthPlan]) -> WidthPlan:
        return compose_width(plans, self.prune.ratio)


def _widths(shapes: list[Any]) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP channels) of every layer of a plan's shapes."""
    return [(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size) for s in shapes]


def compose_width(plans: list[WidthPlan], ratio: float | None = None) -> WidthPlan:
    """One width plan in the dense model's numbering from the cycles' plans (each in the numbering of its own input):
    per layer, the original query heads, KV heads and MLP channels every cycle removed. ``ratio``: the whole target
    (of the dense model); the first plan's target gives the other settings."""
    first, last = plans[0], plans[-1]
    if first.shapes_before is None:
        raise ValueError("the first cycle's plan has no shapes_before (the dense widths)")
    alive = [{"q_heads": list(range(s.num_attention_heads)), "kv_heads": list(range(s.num_key_value_heads)),
              "mlp": list(range(s.intermediate_size))} for s in first.shapes_before]
    removed: list[dict[str, list[int]]] = [{k: [] for k in UNIT_KINDS} for _ in alive]
    for n, plan in enumerate(plans, start=1):
        now = [(len(a["q_heads"]), len(a["kv_heads"]), len(a["mlp"])) for a in alive]
        made = _widths(plan.shapes_before or [])
        if made != now:
            raise ValueError(f"cycle plan {n} was made for layer widths {made}; the cycles before leave {now}")
        for key, rem in plan.layers.items():
            if getattr(rem, "experts", None) or getattr(rem, "expert_channels", None):
                raise ValueError(f"cycle plan {n} removes mixture-of-experts units; only heads, KV groups and MLP channels compose")
            i = int(key)
            for kind in UNIT_KINDS:
                gone = set(getattr(rem, kind))
                removed[i][kind] += [alive[i][kind][j] for j in sorted(gone)]
                alive[i][kind] = [o for j, o in enumerate(alive[i][kind]) if j not in gone]
    after = [(len(a["q_heads"]), len(a["kv_heads"]), len(a["mlp"])) for a in alive]
    if after != _widths(last.shapes_after):
        raise ValueError(f"the composed removals leave widths {after}, the last cycle's plan {last.shapes_after}")
    layers = {str(i): LayerRemoval(**{k: sorted(v) for k, v in r.items()}) for i, r in enumerate(removed) if any(r.values())}
    return WidthPlan(
        criterion=first.criterion, target=first.target.model_copy(update={"ratio": ratio}), layers=layers,
        shapes_before=first.shapes_before, shapes_after=last.shapes_after, uniform=last.uniform,
        num_removed=sum(len(v) for r in removed for v in r.values()), layers_before=first.layers_before,
        layers_after=last.layers_after, params_before=first.params_before, params_after=last.params_after,
        achieved_ratio=round(1 - last.params_after / first.params_before, 6)
        if last.params_after and first.params_before else None)
