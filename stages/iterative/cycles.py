"""Iterative pruning: cycles of score → prune → recover that reach the target step by step (the ``iterate`` stage).

Each cycle scores the model as the previous cycle left it (recovered), removes its share of the target — whole
blocks (depth) or heads / KV groups / MLP channels (width, :mod:`prunelab.stages.iterative.width`) — and heals the
result with the recovery trainer. A cycle writes ``cycle-NN/plan.json`` (in that cycle's numbering), a width
cycle's compensation beside it (``cycle-NN/compensation.safetensors``), its recovery (``cycle-NN/recover/``:
adapter or weights, loss curve, checkpoints) and, last, ``cycle-NN/done.json``; a finished cycle is *replayed* on
``--resume`` — its plan applied with its compensation, then its trained tensors merged (LoRA onto the compensated
weights) or loaded (``full``), exactly what the uninterrupted run did — so a run killed between cycles (or inside
one: the trainer's own checkpoints) continues and ends with the same model. Every cycle seeds torch with
``seed + cycle``, so a cycle does not depend on whether the ones before it ran in the same process.

:func:`compose_depth` / :func:`prunelab.stages.iterative.width.compose_width` map the cycles' plans back to the
dense model's numbering: the composed plan is what ``metrics.json``, the report, the model card and the
intermediate loss's block mapping read. It RECORDS what was removed; it does not rebuild the model from the dense
weights (every cycle's compensation and recovery changed them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.stages.arch import adapter_for
from prunelab.stages.core.files import atomic_write_json
from prunelab.stages.selection.config import BlocksSettings, WidthSettings, validate_selection
from prunelab.stages.core.migrate import explain_old
from prunelab.stages.iterative.width import WidthSchedule
from prunelab.stages.selection.blocks import make_plan, num_blocks_for
from prunelab.stages.surgery.plan import DepthPlan, DepthTarget, Merge, load_plan


def prune_settings(data: Any) -> Any:
    """The ``iterate`` stage's ``prune``: blocks or width settings by ``units`` (the prune stage's, each key checked
    with the same messages); a width target is a ``ratio`` of the dense model's parameters."""
    if isinstance(data, (BlocksSettings, WidthSettings)):
        return data
    cfg = validate_selection(data, {"blocks": BlocksSettings, "width": WidthSettings}, explain_old)
    if isinstance(cfg, WidthSettings) and cfg.layer_ratio is not None:
        raise ValueError("layer_ratio: iterate's width target is `ratio` (of the dense model's parameters); use ratio")
    moe = [k for k in ("experts", "expert_channels") if getattr(cfg, k, None) is not None]
    if moe:
        raise ValueError(f"{', '.join(moe)}: iterate composes heads, KV groups and MLP channels; mixture-of-experts units "
                         "are not iterated yet (prune them with a prune stage)")
    return cfg


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
    prune: BlocksSettings | WidthSettings  # the whole target (of the dense model) and the criterion
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


class DepthSchedule:
    """Depth pruning over ``cycles``: the dense model's block count split evenly (:func:`split_blocks`)."""

    def __init__(self, prune: BlocksSettings, cycles: int, model: Any) -> None:
        self.prune, self.counts = prune, split_blocks(num_blocks_for(prune, adapter_for(model)), cycles)
        self.target = DepthTarget(num_blocks=prune.num_blocks, ratio=prune.ratio, rounding=prune.rounding)

    def select(self, model: Any, c: int, folder: Path, score: Callable[..., tuple[dict[str, Any], Any]]) -> tuple[DepthPlan, dict[str, Any]]:
        k = self.counts[c - 1]
        result, _ = score(model, folder, k, set())
        return make_plan(result, self.prune.model_copy(update={"num_blocks": k, "ratio": None}), adapter_for(model)), {}

    def compose(self, plans: list[DepthPlan]) -> DepthPlan:
        return compose_depth(plans, self.target)


def _removed(plan: Any) -> str:
    if isinstance(plan, DepthPlan):
        return f"removed {plan.removed_blocks} of its input"
    return f"removed {plan.num_removed} units ({plan.achieved_ratio:.2%} of its input's parameters)"


def _side(folder: Path, plan: Any) -> dict[str, Any] | None:
    """A cycle's saved compensation (side tensors), or None."""
    from safetensors.torch import load_file  # lazy: torch-free

    return load_file(str(folder / plan.side_file)) if plan.side_file else None


def _save_side(folder: Path, plan: Any, side: dict[str, Any]) -> None:
    from safetensors.torch import save_file  # lazy: torch-free

    tmp = folder / f".{plan.side_file}.tmp"
    save_file({k: v.contiguous() for k, v in side.items()}, str(tmp))
    tmp.replace(folder / plan.side_file)


def run_cycles(state: Cycles, model: Any, score: Callable[..., tuple[dict[str, Any], Any]] | None,
               recover: Callable[[Any, Path, str, Any], dict[str, Any]] | None) -> tuple[Any, Any]:
    """Every cycle on ``model`` (the dense model; replayed where finished); returns the final model and the composed plan.

    ``score(model, cycle_dir, k, extra_needs)``: the criterion's saved result and the calibration statistics of
    ``model`` (``k``: blocks the cycle removes, None for width; ``extra_needs``: statistics beyond the criterion's);
    ``recover(model, out_dir, label, plan_so_far)``: the recovery summary with the trained model under ``"model"``
    (both None: replay only, every cycle must be finished)."""
    from accelerate.utils import set_seed  # lazy: torch-free

    from prunelab.stages.recovery.model import apply_trained, trained_folder  # lazy: torch-free
    from prunelab.stages.surgery.apply import apply_plan  # lazy: torch-free

    kind = DepthSchedule if isinstance(state.prune, BlocksSettings) else WidthSchedule
    schedule = kind(state.prune, state.cycles, model)  # type: ignore[arg-type]
    plans: list[Any] = []
    state.done = []
    for c in range(1, state.cycles + 1):
        folder = state.cycle_dir(c)
        set_seed(state.seed + c)
        record = state.finished(c)
        if record is not None:
            plan = load_plan(record["plan"])
            apply_plan(model, plan, _side(folder, plan))  # compensation first: LoRA merges onto the compensated weights
            model = apply_trained(model, folder / "recover" / trained_folder(state.method), state.method)
            state.log(f"cycle {c}: replayed from {folder.name} ({_removed(plan)})")
        else:
            if score is None or recover is None:
                raise FileNotFoundError(f"{folder}: no finished cycle to replay")
            folder.mkdir(parents=True, exist_ok=True)
            sizes_before = adapter_for(model).total_params()
            plan, side = schedule.select(model, c, folder, score)
            apply_plan(model, plan, side)
            plan.params_after = adapter_for(model).total_params()
            plan.achieved_ratio = round(1 - plan.params_after / sizes_before, 6)
            if state.is_main:
                if side:
                    _save_side(folder, plan, side)
                atomic_write_json(folder / "plan.json", plan.to_json())
            info = recover(model, folder / "recover", f"cycle-{c:02d}", schedule.compose([*plans, plan]))
            model = info.pop("model")
            record = {"key": state.key, "cycle": c, "plan": plan.to_json(), "recover": info}
            if state.is_main:
                atomic_write_json(folder / "done.json", record)
            state.log(f"cycle {c}/{state.cycles}: {_removed(plan)}, recovered")
        plans.append(plan)
        state.done.append(record)
    return model, schedule.compose(plans)
