"""Checks against the file system and model metadata, run after schema validation and before any
model loads (no torch import): missing data files, unreadable model paths, impossible targets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.recipe import RecipeBase, RecipeError, TextSource


def _sources(node: Any, path: str) -> Iterator[tuple[str, TextSource]]:
    if isinstance(node, TextSource):
        yield path, node
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from _sources(getattr(node, name), f"{path}.{name}")
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _sources(value, f"{path}.{key}")


def preflight(recipe: RecipeBase) -> dict[str, Any]:
    """Raise :class:`RecipeError` listing every problem; return facts learned (e.g. layer count)."""
    from stages.io.sources import classify, num_layers_hint

    problems: list[str] = []
    for where, src in _sources(recipe.stages, "stages"):
        if src.path is None:
            continue
        p = Path(src.path).expanduser()
        if not p.is_file():
            problems.append(
                f"{where}.path: file {src.path!r} not found (relative paths start at the working directory "
                f"{os.getcwd()}); fix the path or run from the project root"
            )
        elif not os.access(p, os.R_OK):
            problems.append(f"{where}.path: file {src.path!r} is not readable; fix its permissions")
    layers = None
    try:
        source = classify(recipe.model.source, recipe.model.gguf_file)
        layers = num_layers_hint(source)
    except (OSError, ValueError) as exc:
        problems.append(str(exc))
    if layers is not None:
        for key, stage in recipe.stages.items():
            check = getattr(stage, "check_model", None)
            if check is not None:
                problems.extend(f"stages.{key}: {msg}" for msg in check(layers))
    if problems:
        raise RecipeError(problems)
    return {"num_layers": layers}
