"""The criterion registry. Entries resolve lazily ("module:function") so validating a recipe stays torch-free."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stages.core.registry import Registry


@dataclass(frozen=True)
class CriterionSpec:
    """A criterion, resolved lazily so that validating a recipe never imports torch.

    ``target`` is ``"module:function"``; ``needs`` names the statistics the collector must gather;
    ``granularity`` says which units it scores ("block" for depth pruning).
    """

    name: str
    target: str
    granularity: str
    needs: frozenset[str] = field(default_factory=frozenset)
    iterative: bool = False
    paper: str = ""

    def load(self) -> Callable[..., Any]:
        module, _, fn = self.target.partition(":")
        return getattr(importlib.import_module(module), fn)


CRITERIA: Registry[CriterionSpec] = Registry("block criterion")
WIDTH_CRITERIA: Registry[CriterionSpec] = Registry("width criterion")


def criteria_for(units: str) -> Registry[CriterionSpec]:
    """The criterion registry for a unit kind: "blocks" (depth) or "width"."""
    return CRITERIA if units == "blocks" else WIDTH_CRITERIA


def register_criterion(
    name: str,
    target: str,
    granularity: str,
    needs: set[str] | frozenset[str] = frozenset(),
    iterative: bool = False,
    paper: str = "",
) -> CriterionSpec:
    registry = CRITERIA if granularity == "block" else WIDTH_CRITERIA
    return registry.register(name, CriterionSpec(name, target, granularity, frozenset(needs), iterative, paper))
