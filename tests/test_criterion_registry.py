"""Criteria are variants of the one registry mechanism (stages.core.registry), like allocations and losses.

The mechanism's guarantees seen through the criteria (duplicates refused in the same words, an unknown name answered
with the closest one, implementations imported on first use), then the proof from outside the library: this module
registers a depth criterion with its own settings — no library file touched — and a recipe naming it validates,
runs on the tiny model and removes the blocks it scored lowest. Seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from prunelab.stages.core.config import StrictModel
from prunelab.stages.core.registry import Variant, VariantRegistry, register_variant
from prunelab.stages.criteria import CRITERIA, criteria_for, register_criterion
from prunelab.stages.criteria.registry import CriterionSpec


class TailSettings(StrictModel):
    """The test criterion's settings: how many of the last blocks it protects."""

    protect_last: int = Field(1, ge=0, description="the last N blocks are never removed")


def tail_first(inp: Any) -> Any:
    """A test criterion: later blocks matter less (score −i), the last ``protect_last`` are protected (∞)."""
    from prunelab.stages.criteria.base import CriterionResult

    n, keep = inp.stats.num_blocks, (inp.settings or TailSettings()).protect_last
    protected = list(range(n - keep, n))
    return CriterionResult(scores=[float("inf") if i in protected else -float(i) for i in range(n)], protected=protected)


# ----------------------------------------------------------------------------- the one mechanism
def test_each_kind_is_a_variant_registry_of_criterion_specs() -> None:
    for kind, units in (("depth", "blocks"), ("width", "width")):
        registry = CRITERIA.of(kind)
        assert isinstance(registry, VariantRegistry) and criteria_for(units) is registry
        assert registry.entry is CriterionSpec and registry.optional_config
        specs = [registry.get(n) for n in registry]
        assert specs and all(isinstance(s, Variant) for s in specs)
        assert all(s.settings is s.config_cls and s.score_fn is s.impl and s.kind == kind for s in specs)
    assert CRITERIA.get("depth", "laco").settings.__name__ == "LacoSettings"
    assert CRITERIA.get("depth", "ppl").settings is None  # no settings: a variant without a config class


def test_duplicates_are_refused_in_the_words_of_every_variant() -> None:
    from prunelab.stages.surgery.targets import ALLOCATIONS

    with pytest.raises(ValueError, match="^depth criterion 'ppl' is already registered$"):
        register_criterion("ppl", f"{__name__}:tail_first", "depth")
    with pytest.raises(ValueError, match="^allocation 'owl' is already registered$"):
        register_variant(ALLOCATIONS, ALLOCATIONS.config("owl"))
    with pytest.raises(ValueError, match="depth criterion without settings: give name="):
        register_variant(CRITERIA.of("depth"), None, tail_first)
    with pytest.raises(TypeError, match="must derive from BaseModel"):
        register_variant(CRITERIA.of("depth"), dict, tail_first, name="tail_first")  # type: ignore[type-var]
    assert "tail_first" not in CRITERIA.of("depth")


def test_an_unknown_name_gets_the_closest_one() -> None:
    from prunelab.recipe import RecipeError, validate

    blocks = criteria_for("blocks")
    assert blocks.unknown("angular", "blocks criterion") == (
        f"unknown blocks criterion 'angular'; choose from {', '.join(blocks.names())} (did you mean 'angular_distance'?)")
    with pytest.raises(KeyError, match=r"unknown width criterion 'flapp'; .* \(did you mean 'flap'\?\)"):
        CRITERIA.get("width", "flapp")
    raw = {"name": "u", "model": {"source": "tiny-random-llama"},
           "stages": {"score": {"type": "score", "criteria": ["block_influence", "angulr_distance"]},
                      "prune": {"type": "prune", "criterion": "blok_influence", "num_blocks": 1}}}
    with pytest.raises(RecipeError) as err:
        validate(raw)
    text = str(err.value)
    assert "stages.score: unknown blocks criterion 'angulr_distance'; choose from" in text
    assert "(did you mean 'angular_distance'?)" in text and "(did you mean 'block_influence'?)" in text


def test_a_score_function_given_as_module_and_name_is_imported_on_first_use() -> None:
    registry = CRITERIA.of("depth")
    spec = register_criterion("tail_lazy", f"{__name__}:tail_first", "depth")
    try:
        assert spec.score_fn == f"{__name__}:tail_first" and spec.load() is tail_first
    finally:
        registry.unregister("tail_lazy")


# ----------------------------------------------------------------------------- registered from outside the library
@pytest.fixture
def registered():
    """The criterion registered the way a plugin would, removed again afterwards."""
    spec = register_criterion("tail_first", tail_first, "depth", settings=TailSettings, paper="a test criterion")
    yield spec
    CRITERIA.of("depth").unregister("tail_first")


def _recipe(tmp_path: Path, **settings: Any) -> Path:
    corpus = {"path": "tests/data/tiny_corpus.txt"}
    recipe = {
        "name": "plugin-criterion", "seed": 0, "model": {"source": "tiny-random-llama"},
        "stages": {
            "calibrate": {"type": "calibrate", "source": corpus, "num_samples": 2, "seq_len": 32},
            "score": {"type": "score", "criteria": ["tail_first", "magnitude"], "settings": {"tail_first": settings}},
            "prune": {"type": "prune", "criterion": "tail_first", "num_blocks": 2},
        },
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_a_recipe_with_a_registered_criterion_validates_and_runs(registered, tmp_path: Path) -> None:
    from prunelab.recipe import load_recipe
    from prunelab.run import main

    assert load_recipe(_recipe(tmp_path, protect_last=2)).stages["score"].settings["tail_first"] == TailSettings(protect_last=2)
    assert main([str(_recipe(tmp_path, protect_last=2)), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    run = tmp_path / "runs" / "plugin-criterion"
    scores = json.loads(next(run.glob("*-score/scores.json")).read_text())
    assert scores["tail_first"]["scores"] == [0.0, -1.0, -2.0, -3.0, None, None]  # the settings reached it
    assert scores["tail_first"]["protected"] == [4, 5] and scores["tail_first"]["paper"] == "a test criterion"
    plan = json.loads(next(run.glob("*-prune/plan.json")).read_text())
    assert plan["criterion"] == "tail_first" and plan["removed_blocks"] == [2, 3]  # lowest unprotected scores


def test_a_registered_criterions_settings_are_checked(registered, tmp_path: Path) -> None:
    from prunelab.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"settings.tail_first.protect_lst: unknown key; did you mean 'protect_last'\?"):
        load_recipe(_recipe(tmp_path, protect_lst=1))
    with pytest.raises(RecipeError, match=r"settings.tail_first.protect_last: Input should be greater than or equal to 0"):
        load_recipe(_recipe(tmp_path, protect_last=-1))


def test_without_the_registration_the_name_is_unknown(tmp_path: Path) -> None:
    from prunelab.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"unknown blocks criterion 'tail_first'; choose from block_influence"):
        load_recipe(_recipe(tmp_path))
