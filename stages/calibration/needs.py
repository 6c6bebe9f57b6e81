"""What a criterion may need from the calibration pass: one registered observer per need.

A criterion declares ``needs={"boundary"}`` (``prunelab.stages.criteria.registry``); each need names one
observer here, so a new statistic is one observer class plus one ``register_need`` call, and the pipelines
(``full``, ``sequential``) never grow an if-chain — llm-compressor's ``CalibrationPipeline`` registry is the
model. Torch-free: the observer is a ``"module:Class"`` string resolved on first use, so a recipe is
validated (and refused at ``--dry-run`` when its pipeline cannot collect a need) without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prunelab.stages.core.registry import Registry

_OBSERVERS = "prunelab.stages.calibration.observers"


@dataclass(frozen=True)
class NeedSpec:
    """A registered statistic.

    ``observer``: the class (or ``"module:Class"``) that collects it; ``requires``: needs it builds on (started
    first); ``refused``: pipeline → why that pipeline cannot collect it yet (the refusal ``--dry-run`` prints)."""

    name: str
    observer: str | type
    requires: tuple[str, ...] = ()
    refused: tuple[tuple[str, str], ...] = ()
    doc: str = ""

    def load(self) -> type:
        if not isinstance(self.observer, str):
            return self.observer
        module, _, cls = self.observer.partition(":")
        return getattr(importlib.import_module(module), cls)

    def refusal(self, pipeline: str) -> str | None:
        return dict(self.refused).get(pipeline)


NEEDS: Registry[NeedSpec] = Registry("calibration statistic")


def register_need(name: str, observer: str | type, requires: Iterable[str] = (),
                  refused: dict[str, str] | None = None, doc: str = "") -> NeedSpec:
    """Register the observer of one statistic (duplicates rejected)."""
    return NEEDS.register(name, NeedSpec(name, observer, tuple(requires), tuple((refused or {}).items()), doc))


def resolve(needs: Iterable[str]) -> list[NeedSpec]:
    """The specs of ``needs`` and of everything they require, each after what it requires (registration order
    otherwise); an unknown name is an error that lists the known ones."""
    wanted: set[str] = set()
    todo = list(needs)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        if name not in NEEDS:
            raise ValueError(f"unknown calibration statistic {name!r}; known: {', '.join(sorted(NEEDS))}")
        wanted.add(name)
        todo += NEEDS.get(name).requires
    ordered: list[NeedSpec] = []
    for name in NEEDS:  # registration order puts a requirement before what builds on it
        if name in wanted:
            ordered.append(NEEDS.get(name))
    return ordered


def refusals(pipeline: str, needs: Iterable[str]) -> dict[str, str]:
    """need → why ``pipeline`` cannot collect it (empty: it can collect them all)."""
    out: dict[str, str] = {}
    for spec in resolve(needs):
        reason = spec.refusal(pipeline)
        if reason is not None:
            out[spec.name] = reason
    return out


register_need("boundary", f"{_OBSERVERS}:BoundaryObserver",
              doc="Σ cos of consecutive block-boundary states (ShortGPT BI); angular distance of every pair at the last token")
register_need("sublayers", f"{_OBSERVERS}:SublayerObserver",
              doc="Σ cos of the residual stream before/after each attention and MLP sublayer")
register_need("removal_nll", f"{_OBSERVERS}:RemovalNLLObserver",
              doc="calibration NLL with each block removed (Shortened LLaMA PPL, SLEB)")
register_need("activations", f"{_OBSERVERS}:ActivationObserver",
              doc="input moments of the observed projections (FLAP, Wanda-sp, OWL) and expert routing statistics")
register_need("hessian", f"{_OBSERVERS}:HessianObserver", requires=("activations",),
              doc="XᵀX of the attention and MLP output projections' inputs (optimal compensation)")
register_need("grad", f"{_OBSERVERS}:GradientObserver",
              doc="Σ ∂L/∂w over batches (Taylor criteria); sequential: the block-wise backward")
register_need("fisher", f"{_OBSERVERS}:MarkerObserver", requires=("grad",),
              doc="Σ (∂L/∂w)² as well (the gradient observer reads this need)")
register_need("hidden", f"{_OBSERVERS}:MarkerObserver", requires=("grad",),
              doc="gradients of the embeddings, norms and head too (hidden channels own them)")
register_need("calibration", f"{_OBSERVERS}:MarkerObserver",
              doc="nothing to collect: the criterion reads the calibration windows itself (the sublayer removals; "
                  "sequential: one layer resident, every sublayer's input states in boundary caches)")
register_need("merge_trials", f"{_OBSERVERS}:MarkerObserver",
              doc="nothing to collect: LaCo runs its trial merges itself, through the recipe's pipeline (sequential: "
                  "from the cached dense boundary states, one block resident)")


def describe() -> dict[str, Any]:
    """need → its one-line description (docs and ``prunelab ls``)."""
    return {name: NEEDS.get(name).doc for name in NEEDS}
