"""Checks against the file system and model metadata, run after schema validation and before any
model loads (no torch import): missing data files, unreadable model paths, impossible targets,
windows longer than the model's context.

The model's sizes come from metadata alone (``stages.io.sources.model_shape``: config.json, a GGUF
header, the hub cache or an alias's record); each stage config that defines
``check_model(num_layers, total_params, block_params, geometries)`` is asked about them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.recipe import RecipeBase, RecipeError


def _settings(node: Any, path: str) -> Iterator[tuple[str, BaseModel]]:
    """(dotted path, settings object) for every pydantic settings object in the stages, lists and mappings included."""
    if isinstance(node, BaseModel):
        yield path, node
        for name in type(node).model_fields:
            yield from _settings(getattr(node, name), f"{path}.{name}")
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _settings(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _settings(value, f"{path}.{i}")


def _local_files(stages: Any) -> Iterator[tuple[str, str]]:
    """(dotted field, file) for every local file a setting names: a text source's ``path`` (or a QA
    source's ``qa_text``, which it exposes as ``path``)."""
    for path, node in _settings(stages, "stages"):
        fields = type(node).model_fields
        file = getattr(node, "path", None)
        if isinstance(file, str) and ("path" in fields or "qa_text" in fields):
            yield (f"{path}.path" if "path" in fields else f"{path}.qa_text"), file


def _file_problems(recipe: RecipeBase) -> list[str]:
    problems = []
    for where, file in _local_files(recipe.stages):
        p = Path(file).expanduser()
        if not p.is_file():
            problems.append(
                f"{where}: file {file!r} not found (relative paths start at the working directory "
                f"{os.getcwd()}); fix the path or run from the project root"
            )
        elif not os.access(p, os.R_OK):
            problems.append(f"{where}: file {file!r} is not readable; fix its permissions")
    return problems


def _lengths(stages: Any) -> Iterator[tuple[str, int]]:
    """(dotted field, tokens) for every window length a stage asks of the model: each ``seq_len``
    (calibration windows, perplexity windows, recovery blocks) and a speed test's prompt + new tokens."""
    for path, node in _settings(stages, "stages"):
        fields = type(node).model_fields
        if "prompt_len" in fields and "new_tokens" in fields:
            yield f"{path}.prompt_len + new_tokens", node.prompt_len + node.new_tokens
        if isinstance(getattr(node, "seq_len", None), int) and "seq_len" in fields:
            yield f"{path}.seq_len", node.seq_len


def _family_problems(recipe: RecipeBase, model_type: str | None) -> list[str]:
    """A model_type without an architecture adapter; compensation whose bias the family cannot hold."""
    from stages.arch import FAMILY_MODULES, compensation_refusal, moe_refusals, unsupported_message
    from stages.selection.engines import engine_refusals

    if model_type is None:
        return []
    if model_type not in FAMILY_MODULES:
        return [f"model.source: {unsupported_message(model_type)}"]
    problems = []
    refusal = compensation_refusal(model_type)
    for path, node in _settings(recipe.stages, "stages"):
        kind = getattr(node, "type", None) if path.endswith(".compensation") else None
        if refusal and (kind == "bias" or (kind == "optimal" and getattr(node, "bias", False))):
            problems.append(f"{path}: {kind} compensation — {refusal}")
    for key, stage in recipe.stages.items():  # expert units on a dense model, dense MLP units on a MoE model
        if getattr(stage, "type", None) == "prune":
            problems += [f"stages.{key}.{msg}" for msg in moe_refusals(model_type, stage)]
            problems += [f"stages.{key}.{msg}" for msg in engine_refusals(model_type, stage)]
    return problems


def _model_problems(recipe: RecipeBase, shape: Any) -> list[str]:
    from stages.arch import dense_moe_layers_refusal

    problems = _family_problems(recipe, shape.model_type)
    refusal = dense_moe_layers_refusal(shape.model_type, list(shape.dense_mlp_layers))
    if refusal:
        problems.append(f"model.source: {refusal}")
    counts = shape.param_counts()
    total, block = counts if counts is not None else (None, None)
    for key, stage in recipe.stages.items():
        check = getattr(stage, "check_model", None)
        if check is not None:
            problems.extend(f"stages.{key}: {msg}" for msg in check(shape.num_layers, total, block, None))
    if shape.max_positions:
        for where, tokens in _lengths(recipe.stages):
            if tokens > shape.max_positions:
                problems.append(
                    f"{where}: {tokens} tokens exceed the model's context (max_position_embeddings = "
                    f"{shape.max_positions}); choose at most {shape.max_positions}"
                )
    return problems


def preflight(recipe: RecipeBase) -> dict[str, Any]:
    """Raise :class:`RecipeError` listing every problem; return what was learned about the model
    (``num_layers``, ``total_params``, ``block_params``, ``max_positions``; None where unknown)."""
    from stages.io.sources import classify, model_shape, model_type_of

    problems = _file_problems(recipe)
    shape = None
    try:
        src = classify(recipe.model.source, recipe.model.gguf_file)
        shape = model_shape(src, recipe.model.revision)
        if shape is None and src.kind == "local":  # sizes under other names (gpt2's n_layer): still check the family
            problems += _family_problems(recipe, model_type_of(src))
    except (OSError, ValueError) as exc:
        problems.append(str(exc))
    if shape is not None:
        problems += _model_problems(recipe, shape)
    from stages.evaluation.zeroshot import recipe_task_problems

    problems += recipe_task_problems(recipe)  # lm-eval task names (cached index) and, offline, their data
    if problems:
        raise RecipeError(problems)
    counts = shape.param_counts() if shape is not None else None
    return {
        "num_layers": shape.num_layers if shape is not None else None,
        "total_params": counts[0] if counts else None,
        "block_params": counts[1] if counts else None,
        "max_positions": shape.max_positions if shape is not None else None,
    }
