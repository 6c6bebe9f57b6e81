"""The one benchmark spec: named rows, each a whole recipe, validated before anything runs.

A spec file is either the native form — a ``base`` recipe, a shared ``evaluate`` stage and ``rows`` of dotted
overrides (``{flap-10: {stages.prune.ratio: 0.1}}``) — or one of the short forms the shipped benches were written
in (criteria × targets, methods × calibration sources, recovery rows), which their own modules compile into the
same :class:`Bench`. Every row is then validated as the recipe it is (``prunelab.recipe.validate``), so a bad row
gets the recipe's own message, prefixed with the row's name, before the first model loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from prunelab.recipe import RecipeBase, RecipeError, StrictModel, check_run_name, load_raw, validate

__all__ = ["Bench", "BenchError", "Row", "compile_rows", "load_bench", "merge", "set_dotted"]

class BenchError(RuntimeError):
    """A spec that cannot run, or rows of an earlier run the command did not say what to do with."""


class Row(StrictModel):
    """One row: a run name, its whole recipe (``name`` and ``output_dir`` are the bench's to set) and what the
    table needs beside the row's ``metrics.json`` (its label, its target, ...)."""

    name: str
    recipe: dict[str, Any]
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _plain(cls, v: str) -> str:
        return check_run_name(v)  # the row's run directory is <output_dir>/<bench>/rows/<name>


class Bench(StrictModel):
    """A benchmark: its rows, the table that assembles them (``kind``) and what that table reports beside them."""

    name: str
    kind: Literal["rows", "grid", "calibration", "recovery", "select_draw"] = "rows"
    output_dir: str = "runs/bench"
    rows: list[Row] = Field(..., min_length=1)
    info: dict[str, Any] = Field(default_factory=dict, description="the table's own settings (cost ratio, seeds ...)")
    _recipes: list[RecipeBase] = PrivateAttr(default_factory=list)

    @field_validator("name")
    @classmethod
    def _plain(cls, v: str) -> str:
        return check_run_name(v)

    @model_validator(mode="after")
    def _every_row_is_a_recipe(self) -> Bench:
        seen: set[str] = set()
        problems: list[str] = []
        for i, row in enumerate(self.rows):
            if row.name in seen:
                problems.append(f"rows[{i}] {row.name!r}: a second row of that name; row names are folder names")
            seen.add(row.name)
            try:
                self._recipes.append(validate({**row.recipe, "name": row.name, "output_dir": str(self.rows_dir)}))
            except RecipeError as exc:
                problems += [f"rows[{i}] {row.name!r}: {p}" for p in exc.problems]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def rows_dir(self) -> Path:
        """Where every row's run directory lives: ``<output_dir>/<name>/rows``."""
        return Path(self.output_dir) / self.name / "rows"

    def recipes(self) -> list[RecipeBase]:
        """The rows' validated recipes, in row order."""
        return list(self._recipes)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``, mappings key by key; a None value deletes the key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(recipe: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"stages.prune.ratio": 0.1}`` applied to a copy of ``recipe`` (None deletes the key)."""
    nested: dict[str, Any] = {}
    for path, value in dotted.items():
        *parents, leaf = path.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return merge(recipe, nested)


def recipe_dict(entry: str | dict[str, Any]) -> dict[str, Any]:
    """A base recipe: a YAML path (read with the recipe loader: includes, interpolation) or a mapping."""
    if isinstance(entry, dict):
        return copy.deepcopy(entry)
    if not Path(entry).is_file():
        raise BenchError(f"base recipe {entry!r} not found (relative paths start at the working directory)")
    return load_raw(entry)


def with_evaluation(recipe: dict[str, Any], evaluation: dict[str, Any] | None, drop: tuple[str, ...] = ("export",)
                    ) -> dict[str, Any]:
    """``recipe`` with its evaluate stages (and ``drop`` stage types) replaced by one shared evaluation at the end."""
    if evaluation is None:
        return recipe
    stages = {k: c for k, c in recipe["stages"].items() if c.get("type") not in ("evaluate", *drop)}
    return {**recipe, "stages": {**stages, "eval": {"type": "evaluate", **evaluation}}}


def compile_rows(raw: dict[str, Any]) -> dict[str, Any]:
    """The native form: ``base`` (a recipe path or mapping), optional ``evaluate`` (replaces the base's evaluate
    and export stages in every row), ``rows`` (name → dotted overrides; ``dense: true`` evaluates the base model
    only) → a :class:`Bench`'s data."""
    unknown = set(raw) - {"name", "output_dir", "base", "evaluate", "rows", "kind"}
    if unknown:
        raise BenchError(f"unknown keys {sorted(unknown)}; a bench spec has name, output_dir, base, evaluate, rows")
    for key in ("name", "base", "rows"):
        if key not in raw:
            raise BenchError(f"{key}: missing; a bench spec names its base recipe and its rows (name → overrides)")
    if not isinstance(raw["rows"], dict) or not raw["rows"]:
        raise BenchError("rows: write a mapping of row name → {dotted.key: value} overrides, e.g. {flap-10: "
                         "{stages.prune.ratio: 0.1}}")
    base = with_evaluation(recipe_dict(raw["base"]), raw.get("evaluate"))
    rows = []
    for name, over in raw["rows"].items():
        over = dict(over or {})
        if over.pop("dense", False):
            ev = raw.get("evaluate") or {}
            recipe = {k: v for k, v in base.items() if k != "stages"}
            recipe["stages"] = {"eval": {"type": "evaluate", **ev, "label": "dense"}}
            rows.append({"name": name, "recipe": set_dotted(recipe, over), "meta": {"dense": True}})
        else:
            rows.append({"name": name, "recipe": set_dotted(base, over)})
    return {"name": raw["name"], "kind": "rows", "output_dir": raw.get("output_dir", "runs/bench"), "rows": rows}


def build(data: dict[str, Any]) -> Bench:
    """A validated :class:`Bench`, or :class:`BenchError` listing every problem (row and field named)."""
    try:
        return Bench.model_validate(data)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            where = ".".join(map(str, e["loc"]))
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines += [f"{where}: {m}" if where else m for m in msg.splitlines()]
        raise BenchError("the bench spec is not valid:\n  - " + "\n  - ".join(lines)) from None


def load_bench(path: str | Path, output_dir: str | None = None) -> Bench:
    """A spec file, in any of its forms, validated row by row."""
    try:
        raw = load_raw(path)
    except RecipeError as exc:
        raise BenchError(str(exc)) from None
    if not isinstance(raw, dict):
        raise BenchError(f"{path}: a bench spec is a mapping")
    if "criteria" in raw or "targets" in raw or "width" in raw:
        from prunelab.benchmarks.grid import compile_grid  # lazy: cycle

        data = compile_grid(raw)
    elif "methods" in raw and "calibrations" in raw:
        from prunelab.benchmarks.tables import compile_calibration  # lazy: cycle

        data = compile_calibration(raw, Path(path).stem)
    elif "bases" in raw:
        from prunelab.benchmarks.tables import compile_recovery  # lazy: cycle

        data = compile_recovery(raw, Path(path).stem)
    else:
        data = compile_rows(raw)
    if output_dir is not None:
        data["output_dir"] = output_dir
    return build(data)
