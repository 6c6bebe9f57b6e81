"""One registry mechanism for every variant a recipe chooses by its ``type`` (stages.core.registry).

The mechanism on its own (duplicates refused, names listed, bare names, a union that grows after the model holding it
was built), then the proof from outside the library: this module registers a new allocation and a new recovery loss
— no library file touched — and a recipe using both validates and runs on the tiny model. Seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import yaml
from pydantic import Field, ValidationError

from prunelab.stages.core.config import StrictModel
from prunelab.stages.core.registry import (
    Registry,
    VariantRegistry,
    register_variant,
    tagged_union,
    variant,
    variant_names,
)


# ----------------------------------------------------------------------------- the mechanism
class _Shape(StrictModel):
    type: str


def _shapes() -> VariantRegistry:
    shapes = VariantRegistry("shape", base=_Shape)

    @variant(shapes)
    class Square(_Shape):
        type: Literal["square"] = "square"
        side: float = Field(1.0, gt=0)

    register_variant(shapes, type("Dot", (_Shape,), {"__annotations__": {"type": Literal["dot"]}, "type": "dot"}))
    return shapes


def test_a_variant_is_named_by_its_tag_and_registered_once() -> None:
    shapes = _shapes()
    assert shapes.names() == ["square", "dot"]
    with pytest.raises(ValueError, match="shape 'square' is already registered"):
        register_variant(shapes, shapes.config("square"))
    with pytest.raises(TypeError, match="must derive from _Shape"):
        register_variant(shapes, StrictModel)
    with pytest.raises(ValueError, match="give name="):
        register_variant(shapes, type("NoDefault", (_Shape,), {}))


def test_the_field_grows_with_the_registry_and_errors_name_the_choices() -> None:
    shapes = _shapes()

    class Drawing(StrictModel):
        shape: tagged_union(shapes) = Field(default_factory=lambda: shapes.config("dot")())  # type: ignore[valid-type]

    assert Drawing(shape="square").shape.side == 1.0  # a bare name is the variant with its defaults
    assert Drawing.model_validate({"shape": {"type": "square", "side": 2}}).model_dump() == {"shape": {"type": "square", "side": 2.0}}
    with pytest.raises(ValidationError, match=r"shape 'squar': choose square \| dot \(did you mean 'square'\?\)"):
        Drawing(shape="squar")
    with pytest.raises(ValidationError, match=r"shape.sid\n.*unknown key; did you mean 'side'\?"):
        Drawing(shape={"type": "square", "sid": 2})
    with pytest.raises(ValidationError, match="`type:` is missing"):
        Drawing(shape={"side": 2})

    class Circle(_Shape):  # registered after Drawing was built: accepted, dumped with its own fields
        type: Literal["circle"] = "circle"
        radius: float = 1.0

    register_variant(shapes, Circle)
    assert Drawing(shape={"type": "circle", "radius": 3}).model_dump() == {"shape": {"type": "circle", "radius": 3.0}}
    assert variant_names(Drawing.model_fields["shape"]) == ["square", "dot", "circle"]
    shapes.unregister("circle")
    with pytest.raises(ValidationError, match="choose square | dot"):
        Drawing(shape="circle")


def test_a_frozen_union_is_pydantics_discriminated_union_of_the_entries() -> None:
    shapes = _shapes()

    class Drawing(StrictModel):
        shape: tagged_union(shapes, frozen=True)  # type: ignore[valid-type]

    assert type(Drawing(shape={"type": "square"}).shape).__name__ == "Square"
    with pytest.raises(ValidationError, match="union_tag_invalid|does not match any of the expected tags"):
        Drawing(shape={"type": "hexagon"})


def test_every_chosen_variant_uses_the_mechanism() -> None:
    """Allocations, compensations, losses and prune units are variant registries; export formats, stages and
    criteria are registries of the same module; the fields a recipe fills read them."""
    from prunelab.stages.io.formats import FORMATS
    from prunelab.stages.recovery.config import LOSSES, RecoverySettings
    from prunelab.stages.selection.config import ALLOCATIONS, COMPENSATIONS, SELECTIONS, WidthSettings

    assert ALLOCATIONS.names() == ["uniform", "global", "owl", "alpha"]
    assert COMPENSATIONS.names() == ["none", "bias", "optimal"]
    assert SELECTIONS.names() == ["blocks", "width", "hidden", "sublayers"]
    assert LOSSES.names() == ["ce", "kd", "ce+kd"]
    assert FORMATS.names() == ["hf", "gguf", "vllm"]
    assert isinstance(FORMATS, Registry)
    assert variant_names(WidthSettings.model_fields["allocation"]) == ALLOCATIONS.names()
    assert variant_names(WidthSettings.model_fields["compensation"]) == COMPENSATIONS.names()
    assert variant_names(RecoverySettings.model_fields["loss"]) == LOSSES.names()


# ----------------------------------------------------------------------------- registered from outside the library
CALLS: list[str] = []


def front_light(model: Any, stats: Any, layers: list[int], cfg: Any) -> tuple[list[float], dict[str, Any]]:
    """A test allocation: the first pruned layer loses r − spread, the last r + spread, linear in between."""
    n = model.config.num_hidden_layers
    step = 2 * cfg.spread / max(len(layers) - 1, 1)
    offsets = [0.0] * n
    for j, i in enumerate(layers):
        offsets[i] = -cfg.spread + j * step
    return offsets, {}


def smoothed_ce(model: Any, batch: dict[str, torch.Tensor], teacher: Any, settings: Any) -> torch.Tensor:
    """A test loss: next-token cross-entropy with label smoothing (positions without a label ignored)."""
    CALLS.append(settings.type)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100, label_smoothing=settings.smoothing)


@pytest.fixture
def registered():
    """The allocation and the loss registered the way a plugin would, removed again afterwards."""
    from prunelab.stages.recovery.config import LOSSES, LossBase
    from prunelab.stages.recovery.losses import register_loss
    from prunelab.stages.surgery.targets import ALLOCATIONS, AllocationBase

    class FrontLightAllocation(AllocationBase):
        type: Literal["front_light"] = "front_light"
        spread: float = Field(0.1, ge=0, lt=0.5, description="layer ratios span r ± spread, lightest first")

    class SmoothedLoss(LossBase):
        type: Literal["smoothed_ce"] = "smoothed_ce"
        smoothing: float = Field(0.1, ge=0, lt=1)

    register_variant(ALLOCATIONS, FrontLightAllocation, front_light)
    register_loss("smoothed_ce", smoothed_ce, settings=SmoothedLoss)
    CALLS.clear()
    yield
    ALLOCATIONS.unregister("front_light")
    LOSSES.unregister("smoothed_ce")


def _recipe(tmp_path: Path, **prune: Any) -> Path:
    corpus = {"path": "tests/data/tiny_corpus.txt"}
    ppl = {"tiny": {"source": corpus, "seq_len": 128, "max_tokens": 2048}}
    recipe = {
        "name": "plugin-variants", "seed": 0, "model": {"source": "tiny-random-llama"},
        "stages": {
            "calibrate": {"type": "calibrate", "source": corpus, "num_samples": 4, "seq_len": 64},
            "score": {"type": "score", "units": "width", "criteria": ["magnitude"]},
            "prune": {"type": "prune", "units": "width", "criterion": "magnitude", "layer_ratio": 0.25, "attention": "none",
                      "allocation": {"type": "front_light", "spread": 0.2}, **prune},
            "recover": {"type": "recover", "loss": {"type": "smoothed_ce", "smoothing": 0.2},
                        "data": {"source": corpus, "seq_len": 64, "max_samples": 16}, "lora": {"rank": 4, "alpha": 8},
                        "loop": {"batch_size": 4, "micro_batch_size": 2, "max_steps": 2}},
            "eval": {"type": "evaluate", "perplexity": ppl},
        },
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_a_recipe_with_a_registered_allocation_and_loss_validates_and_runs(registered, tmp_path: Path) -> None:
    from prunelab.recipe import load_recipe
    from prunelab.run import main

    recipe = load_recipe(_recipe(tmp_path))
    assert recipe.stages["prune"].allocation.spread == 0.2 and recipe.stages["recover"].loss.smoothing == 0.2
    assert main([str(_recipe(tmp_path)), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    run = tmp_path / "runs" / "plugin-variants"
    plan = json.loads(next(run.glob("*-prune/plan.json")).read_text())
    assert plan["target"]["allocation"] == {"type": "front_light", "spread": 0.2}
    widths = [s["intermediate_size"] for s in plan["shapes_after"]]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]  # the first layers lose least
    assert CALLS and set(CALLS) == {"smoothed_ce"}  # the trainer called the registered loss
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["recover"]["pruned"]["steps"] == 2


def test_a_registered_variants_settings_are_checked_and_unregistered_names_refused(registered, tmp_path: Path) -> None:
    from prunelab.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"allocation.spred: unknown key; did you mean 'spread'\?"):
        load_recipe(_recipe(tmp_path, allocation={"type": "front_light", "spred": 0.2}))
    with pytest.raises(RecipeError, match=r"spread.*less than 0.5"):
        load_recipe(_recipe(tmp_path, allocation={"type": "front_light", "spread": 0.7}))


def test_without_the_registration_the_names_are_unknown(tmp_path: Path) -> None:
    from prunelab.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"allocation 'front_light': choose uniform \| global \| owl \| alpha"):
        load_recipe(_recipe(tmp_path))
