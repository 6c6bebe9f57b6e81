"""Explicit name → object registries (stages, criteria).

Registration is one call that rejects duplicate names, as peft's ``register_peft_method`` does:
two modules silently fighting over a name is a bug we want to see at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to entries that refuses to register a name twice."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


@dataclass(frozen=True)
class StageSpec:
    """A stage: its pydantic config class, ``run(ctx, cfg) -> dict`` and, for ``--resume``,
    ``restore(ctx, cfg, outputs, stage_dir)`` which reloads what a finished run left on disk."""

    name: str
    config_cls: type
    run: Callable[..., dict[str, Any]]
    restore: Callable[..., None] | None = None


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


STAGES: Registry[StageSpec] = Registry("stage type")
CRITERIA: Registry[CriterionSpec] = Registry("block criterion")
WIDTH_CRITERIA: Registry[CriterionSpec] = Registry("width criterion")


def criteria_for(units: str) -> Registry[CriterionSpec]:
    """The criterion registry for a unit kind: "blocks" (depth) or "width"."""
    return CRITERIA if units == "blocks" else WIDTH_CRITERIA


def register_stage(
    name: str, config_cls: type, run: Callable[..., dict[str, Any]], restore: Callable[..., None] | None = None
) -> StageSpec:
    return STAGES.register(name, StageSpec(name, config_cls, run, restore))


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
