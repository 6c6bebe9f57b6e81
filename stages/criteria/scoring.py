"""The one scoring path, for depth and width, shared by the score stage and the benchmark: which statistics a set
of criteria needs, one criterion's typed result from a finished calibration pass, and ``score_criteria`` — the
pass plus every criterion, each result saved the moment it is done (``partial/<criterion>.json``) so a killed
run resumes without recomputing it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunelab.stages.calibration.pipelines import collect
from prunelab.stages.core.files import atomic_write_json
from prunelab.stages.criteria.base import CriterionInputs
from prunelab.stages.criteria.registry import CRITERIA, CriterionSpec
from prunelab.stages.calibration.streamed import is_streamed, layers_resident

if TYPE_CHECKING:
    from pydantic import BaseModel

    from prunelab.stages.calibration.stats import CalibrationStats
    from prunelab.stages.criteria.base import CriterionInputs, CriterionResult

# Width passes always observe projection inputs: FLAP's bias compensation and OWL's allocation read them.
ALWAYS: dict[str, frozenset[str]] = {"depth": frozenset(), "width": frozenset({"activations"})}


def needs_for(kind: str, names: Iterable[str], extra: Iterable[str] = ()) -> set[str]:
    """Statistics one calibration pass must collect for the criteria ``names`` of ``kind``.

    ``extra``: what the later prune stage needs beyond its criterion — ``hidden`` (gradients of the embeddings,
    norms and head for hidden channels), ``hessian`` (XᵀX of o_proj/down_proj inputs for optimal compensation)."""
    return set(ALWAYS[kind]) | set(extra) | set().union(*(CRITERIA.get(kind, n).needs for n in names))


def score(spec: CriterionSpec, inputs: CriterionInputs, hidden: bool = False) -> CriterionResult:
    """One criterion's result, with its paper and ``seconds``; ``hidden`` adds the hidden-channel scores where the
    criterion defines them. ``seconds`` charges the shared calibration pass to every data-driven criterion (what it
    would cost alone) and nothing to the data-free ones (magnitude, random)."""
    t0 = time.perf_counter()
    result = spec.load()(inputs)
    if hidden and spec.hidden is not None:
        result.hidden = spec.load_hidden()(inputs)
    result.paper = spec.paper
    result.seconds = round(time.perf_counter() - t0 + (inputs.stats.seconds if spec.needs else 0.0), 3)
    return result


class PartialResults:
    """``<folder>/<criterion>.json``, written as each criterion finishes; ``<folder>/inputs.json`` records the key
    of what they were computed from (a digest of every setting up to the score stage). Results under another key,
    or under none (an older version), are stale: they are removed, never reused."""

    def __init__(self, folder: Path, key: str, write: bool = True) -> None:
        self.folder, self.key, self.write = folder, key, write

    def load(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        try:
            trusted = json.loads((self.folder / "inputs.json").read_text()).get("key") == self.key
        except FileNotFoundError:  # none yet, or the main process is removing stale ones
            trusted = False
        if trusted:
            return {n: json.loads(p.read_text()) for n in names if (p := self.folder / f"{n}.json").is_file()}
        if self.write and self.folder.exists():
            shutil.rmtree(self.folder)
        return {}

    def save(self, name: str, result: dict[str, Any]) -> None:
        if not self.write:
            return
        if not (self.folder / "inputs.json").is_file():
            atomic_write_json(self.folder / "inputs.json", {"key": self.key})
        atomic_write_json(self.folder / f"{name}.json", result)


def score_criteria(
    kind: str, names: list[str], model: Any, calibration: Any, *, settings: dict[str, BaseModel] | None = None,
    seed: int = 0, batch_size: int = 1, extra_needs: Iterable[str] = (), hidden: bool = False,
    num_remove: Callable[[], int | None] | None = None, partial: PartialResults | None = None, progress: bool = True,
    log: Callable[[str], None] | None = None, pipeline: Any = None, prune: Any = None,
) -> tuple[dict[str, dict[str, Any]], CalibrationStats]:
    """Every criterion's saved result (``to_json``), in ``names`` order, and the statistics of the one pass.

    Finished criteria found in ``partial`` are re-used; the pass collects what the others need plus ``extra_needs``
    (and, for width, the projection inputs), through ``pipeline`` (``prunelab.stages.calibration.pipelines``; default
    full). ``num_remove`` gives iterative criteria the later prune stage's target (``prune``: its settings)."""
    settings = settings or {}
    done = partial.load(names) if partial is not None else {}
    todo = [n for n in names if n not in done]
    if done and log is not None:
        log(f"re-using finished criteria {sorted(done)}")
    if is_streamed(model):  # the export collects each block's XᵀX itself: all layers' would be the model's size again
        extra_needs = set(extra_needs) - {"hessian"}
    stats = collect(model, calibration, needs_for(kind, todo, extra_needs), batch_size, progress, pipeline)
    with layers_resident(model):  # a streamed skeleton: each layer materialized while a criterion's loop holds it
        for name in todo:
            spec = CRITERIA.get(kind, name)
            inputs = CriterionInputs(model, stats, seed, settings.get(name), calibration, batch_size,
                                     num_remove() if spec.iterative and num_remove is not None else None, progress,
                                     prune=prune if spec.iterative else None, pipeline=pipeline)
            done[name] = score(spec, inputs, hidden).to_json()
            if partial is not None:
                partial.save(name, done[name])
            if log is not None:
                log(f"scored {name} ({kind}) in {done[name]['seconds']:.1f}s")
    return {n: done[n] for n in names}, stats
