"""The stage registry: the one way the frame reaches stage modules.

Dependency-free (no torch, no stage imports), so stage modules may import it to register themselves.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import prunelab.stages as stages
from prunelab.stages.core.registry import Registry


@dataclass(frozen=True)
class StageSpec:
    """A stage: its pydantic config class, ``run(ctx, cfg) -> dict`` and, for ``--resume``,
    ``restore(ctx, cfg, outputs, stage_dir)`` which reloads what a finished run left on disk.

    ``section`` names a top-level recipe key holding the stage's settings (``model:`` for ``load``, which
    runs first in every recipe); other stages appear under ``stages:`` with ``type: <name>``."""

    name: str
    config_cls: type
    run: Callable[..., dict[str, Any]]
    restore: Callable[..., None] | None = None
    section: str | None = None


STAGES: Registry[StageSpec] = Registry("stage type")


def register_stage(
    name: str, config_cls: type, run: Callable[..., dict[str, Any]], restore: Callable[..., None] | None = None,
    section: str | None = None,
) -> StageSpec:
    return STAGES.register(name, StageSpec(name, config_cls, run, restore, section))


def listed_stage_types() -> list[str]:
    """Stage types a recipe lists under ``stages:`` (every registered stage but the sectioned ones)."""
    return [n for n in STAGES.names() if STAGES.get(n).section is None]


def stage_modules() -> list[str]:
    """Every module directly in ``stages/`` (a stage by the layout rule), in a stable order."""
    return sorted(f"prunelab.stages.{m.name}" for m in pkgutil.iter_modules(stages.__path__) if not m.ispkg)


def load_stages() -> Registry[StageSpec]:
    """Import every stage module once (each registers itself; none imports torch) and return the registry."""
    for name in stage_modules():
        importlib.import_module(name)
    return STAGES
