"""Iterative pruning: cycles of score → prune → recover that reach the target step by step (the ``iterate`` stage).

Each cycle scores the model as the previous cycle left it (recovered), removes its share of the blocks, and heals
the result with the recovery trainer. A cycle writes ``cycle-NN/plan.json`` (in that cycle's numbering), its
recovery (``cycle-NN/recover/``: adapter or weights, loss curve, checkpoints) and, last, ``cycle-NN/done.json``;
a finished cycle is *replayed* on ``--resume`` — its plan applied and its trained tensors merged, exactly what the
uninterrupted run did — so a run killed between cycles (or inside one: the trainer's own checkpoints) continues
and ends with the same model. Every cycle seeds torch with ``seed + cycle``, so a cycle does not depend on
whether the ones before it ran in the same process.

:func:`compose_depth` maps the cycles' plans back to the original numbering: the composed plan is what
``metrics.json``, the report, the model card and the intermediate loss's block mapping read. It RECORDS what was
removed; it does not rebuild the model from the dense weights (every cycle's recovery changed them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core.files import atomic_write_json
from stages.selection.config import BlocksSettings
from stages.surgery.plan import DepthPlan, DepthTarget, Merge, load_plan


def split_blocks(total: int, cycles: int) -> list[int]:
    """Blocks each cycle removes: ``total`` spread evenly, the earlier cycles taking the remainder."""
    if total < cycles:
        raise ValueError(f"the target removes {total} blocks, fewer than cycles={cycles}: every cycle must remove one")
    return [total // cycles + (1 if c < total % cycles else 0) for c in range(cycles)]


def compose_depth(plans: list[DepthPlan], target: DepthTarget) -> DepthPlan:
    """One depth plan in the original numbering from the cycles' plans (each in the numbering of its own input)."""
    original = list(range(plans[0].layers_before))
    removed: list[int] = []
    merges: list[Merge] = []
    for plan in plans:
        if plan.layers_before != len(original):
            raise ValueError(f"cycle plan made for {plan.layers_before} blocks follows a model of {len(original)}")
        merges += [Merge(into=original[m.into], from_=[original[j] for j in m.from_]) for m in plan.merges]
        removed += [original[i] for i in plan.removed_blocks]
        gone = set(plan.removed_blocks)
        original = [o for i, o in enumerate(original) if i not in gone]
    first, last = plans[0], plans[-1]
    return DepthPlan(criterion=first.criterion, target=target, merges=merges, removed_blocks=sorted(removed),
                     num_removed=len(removed), layers_before=first.layers_before, layers_after=len(original),
                     params_before=first.params_before, params_after=last.params_after,
                     achieved_ratio=round(1 - last.params_after / first.params_before, 6)
                     if last.params_after and first.params_before else None)


@dataclass
class Cycles:
    """What the cycles need from the run (not the run context: the library is callable on its own)."""

    folder: Path  # the stage's folder; cycle-NN/ inside
    key: str  # digest of every setting the cycles depend on; a finished cycle under another key is redone
    prune: BlocksSettings  # the whole target (of the dense model) and the criterion
    cycles: int
    method: str  # recovery method (which trained folder a cycle leaves)
    seed: int = 0
    is_main: bool = True
    resume: bool = False
    log: Callable[[str], None] = print
    done: list[dict[str, Any]] = field(default_factory=list)  # each cycle's record (plan + recovery summary)

    def cycle_dir(self, c: int) -> Path:
        return self.folder / f"cycle-{c:02d}"

    def finished(self, c: int) -> dict[str, Any] | None:
        path = self.cycle_dir(c) / "done.json"
        if not self.resume or not path.is_file():
            return None
        record = json.loads(path.read_text())
        return record if record.get("key") == self.key else None


def settings_key(*dumps: Any) -> str:
    return hashlib.sha256(json.dumps(dumps, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_cycles(state: Cycles, model: Any, score: Callable[[Any, int, Path], dict[str, Any]] | None,
               recover: Callable[[Any, Path, str, DepthPlan], dict[str, Any]] | None) -> tuple[Any, DepthPlan]:
    """Every cycle on ``model`` (replayed where finished); returns the final model and the composed plan.

    ``score(model, k, cycle_dir)``: the criterion's saved result for removing ``k`` blocks; ``recover(model,
    out_dir, label, plan_so_far)``: the recovery summary with the trained model under ``"model"`` (both None:
    replay only, every cycle must be finished)."""
    from accelerate.utils import set_seed

    from stages.arch import adapter_for
    from stages.recovery.model import apply_trained, trained_folder
    from stages.selection.blocks import make_plan, num_blocks_for
    from stages.surgery.apply import apply_plan

    counts = split_blocks(num_blocks_for(state.prune, adapter_for(model)), state.cycles)
    target = DepthTarget(num_blocks=state.prune.num_blocks, ratio=state.prune.ratio, rounding=state.prune.rounding)
    plans: list[DepthPlan] = []
    state.done = []
    for c, k in enumerate(counts, start=1):
        folder = state.cycle_dir(c)
        set_seed(state.seed + c)
        record = state.finished(c)
        if record is not None:
            plan = load_plan(record["plan"])
            apply_plan(model, plan)
            model = apply_trained(model, folder / "recover" / trained_folder(state.method), state.method)
            state.log(f"cycle {c}: replayed from {folder.name} (removed {plan.removed_blocks} of its input)")
        else:
            if score is None or recover is None:
                raise FileNotFoundError(f"{folder}: no finished cycle to replay")
            folder.mkdir(parents=True, exist_ok=True)
            result = score(model, k, folder)
            sizes_before = adapter_for(model).total_params()
            plan = make_plan(result, state.prune.model_copy(update={"num_blocks": k, "ratio": None}), adapter_for(model))
            apply_plan(model, plan)
            plan.params_after = adapter_for(model).total_params()
            plan.achieved_ratio = round(1 - plan.params_after / sizes_before, 6)
            if state.is_main:
                atomic_write_json(folder / "plan.json", plan.to_json())
            info = recover(model, folder / "recover", f"cycle-{c:02d}", compose_depth([*plans, plan], target))
            model = info.pop("model")
            record = {"key": state.key, "cycle": c, "plan": plan.to_json(), "recover": info}
            if state.is_main:
                atomic_write_json(folder / "done.json", record)
            state.log(f"cycle {c}/{state.cycles}: removed {plan.removed_blocks} of its input, recovered")
        plans.append(plan)
        state.done.append(record)
    return model, compose_depth(plans, target)
