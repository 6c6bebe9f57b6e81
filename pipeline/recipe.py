"""Recipe schema: YAML (+ CLI dotlist) → OmegaConf → plain dict → pydantic, every error at once.

Nothing here imports torch: validating a recipe must take well under two seconds so that a typo is
reported before any model or data is touched. Stage config classes live beside their stages
(``stages/<name>.py``) and are stitched into one discriminated union on ``type`` at first use.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Annotated, Any, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from pipeline.registry import STAGES, listed_stage_types
from stages.core.config import StrictModel
from stages.io.config import ModelConfig, TextSource

__all__ = ["ModelConfig", "RecipeBase", "RecipeError", "StrictModel", "TextSource", "load_recipe", "validate"]

STAGE_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class RecipeBase(StrictModel):
    """Fields every recipe has. ``stages`` is added by :func:`recipe_model` once stages register."""

    name: str = Field(..., description="run name; the run directory is <output_dir>/<name>")
    seed: int = Field(0, description="seed for sampling, random criteria and torch")
    output_dir: str = Field("runs", description="parent folder of run directories")
    model: ModelConfig

    @model_validator(mode="after")
    def _cross_stage_rules(self) -> RecipeBase:
        stages: dict[str, Any] = self.stages
        errors: list[str] = []
        seen: list[str] = []
        for key, cfg in stages.items():
            if not STAGE_KEY.match(key):
                errors.append(f"stages.{key}: stage names use letters, digits, '_' or '-' and start with a letter")
            check = getattr(cfg, "check_order", None)
            if check is not None:
                errors.extend(f"stages.{key}: {msg}" for msg in check(key, seen, stages))
            seen.append(key)
        if errors:
            raise ValueError("; ".join(errors))
        return self


@functools.cache
def recipe_model() -> type[RecipeBase]:
    """Build the Recipe class with ``stages`` as an ordered mapping of the registered stage configs."""
    from pipeline.registry import load_stages

    load_stages()

    configs = tuple(STAGES.get(n).config_cls for n in listed_stage_types())
    union = Annotated[Union[configs], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007 (a runtime tuple of classes)
    return create_model(
        "Recipe",
        __base__=RecipeBase,
        stages=(dict[str, union], Field(..., description="ordered mapping: stage name → settings with `type:`")),
    )


class RecipeError(ValueError):
    """Every problem in a recipe, one per line, each naming its field and the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """OmegaConf load → from_dotlist(overrides) → merge → plain, resolved dict."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file {str(path)!r} not found; give the path to a YAML file such as recipes/debug.yaml"])
    try:
        base = OmegaConf.load(path)
        bad = [o for o in overrides or [] if "=" not in o]
        if bad:
            raise RecipeError([f"override {o!r} must look like key.path=value" for o in bad])
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides or [])))
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise RecipeError([f"{path}: {exc}".replace("\n", " ")]) from None
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: a recipe is a YAML mapping with name, model and stages"])
    return raw


def validate(raw: dict[str, Any]) -> RecipeBase:
    """Validate a plain dict, turning pydantic's errors into messages that name the field and the fix."""
    model_cls = recipe_model()
    try:
        return model_cls.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError([_explain(err, raw) for err in exc.errors()]) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeBase:
    return validate(load_raw(path, overrides))


# ----------------------------------------------------------------------------- error messages
def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the discriminator tag pydantic inserts after a stage's name: stages.prune.prune.ratio → stages.prune.ratio."""
    if len(loc) > 2 and loc[0] == "stages" and loc[2] in STAGES:
        return loc[:2] + loc[3:]
    return loc


def _model_at(loc: tuple[Any, ...], raw: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic class that owns the mapping at ``loc`` (for listing allowed keys)."""
    cls: type[BaseModel] | None = recipe_model()
    node: Any = raw
    i = 0
    while i < len(loc) and cls is not None:
        key = loc[i]
        if cls is recipe_model() and key == "stages" and i + 1 < len(loc):
            stage_raw = (node.get("stages") or {}).get(loc[i + 1], {})
            stype = stage_raw.get("type") if isinstance(stage_raw, dict) else None
            cls = STAGES.get(stype).config_cls if stype in STAGES else None
            node, i = stage_raw, i + 2
            continue
        field = cls.model_fields.get(key)
        if field is None:
            return cls
        node = node.get(key, {}) if isinstance(node, dict) else {}
        ann = field.annotation
        cls = _first_model(ann)
        if cls is not None and getattr(ann, "__origin__", None) is dict and i + 1 < len(loc):
            node = node.get(loc[i + 1], {}) if isinstance(node, dict) else {}
            i += 1
        i += 1
    return cls


def _first_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _explain(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = _clean_loc(tuple(err["loc"]))
    where = ".".join(str(p) for p in loc) or "recipe"
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1], raw)
        allowed = sorted(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where}: unknown key; {hint}allowed keys here: {', '.join(allowed)}"
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        close = difflib.get_close_matches(str(tag), listed_stage_types(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}.type: unknown stage type {tag!r}{hint}; choose one of {', '.join(listed_stage_types())}"
    if kind == "union_tag_not_found":
        return f"{where}: every stage needs `type:`, one of {', '.join(listed_stage_types())}"
    if kind == "missing":
        return f"{where}: required field is missing; add it to the recipe or pass {where}=... on the command line"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return msg if not loc else f"{where}: {msg}"
    return f"{where}: {msg} (got {err.get('input')!r})"
