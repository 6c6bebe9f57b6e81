"""The big-model benchmark's recipes (``pipeline/benchmarks/big_model.py``): every method a valid streamed recipe and a
valid resident reference, and LaCo's streamed and resident runs giving the same plan on a small random model (the
bench compares their peak RSS, so both must do the same work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prunelab.api import load_recipe
from prunelab.benchmarks import big_model


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A 6-block random Llama of the bench's layout (hidden 64) and its build info."""
    folder = tmp_path_factory.mktemp("bench") / "model"
    return folder, big_model.build(folder, hidden=64, layers=6, heads=4, kv_heads=2, intermediate=128, vocab=320,
                                   shard_mb=0.1)


@pytest.mark.parametrize("resident", [False, True], ids=["streamed", "resident"])
@pytest.mark.parametrize("method", big_model.METHODS)
def test_every_method_is_a_valid_recipe(method: str, resident: bool, small: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = small
    spec = big_model.recipe(method, folder, 8, 128, resident)
    recipe = load_recipe(spec)  # the cross-stage rules included: streaming allows only block-by-block stages
    assert recipe.model.load == ("resident" if resident else "streaming")
    assert recipe.stages["calibrate"].pipeline.type == ("full" if resident else "sequential")
    streamed = big_model.recipe(method, folder, 8, 128)
    # the reference differs only in where the model lives: the same criterion, target and export
    assert {k: v for k, v in spec["stages"].items() if k != "calibrate"} == \
        {k: v for k, v in streamed["stages"].items() if k != "calibrate"}


def test_unknown_method_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="laco"):
        big_model.recipe("sleb", tmp_path, 8, 128)


def test_laco_streamed_and_resident_same_plan(small: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """Both children finish, the merges are equal, both exports reload."""
    folder, info = small
    rows = [big_model.run_method("laco", folder, tmp_path / "out", 4, 32, info["bytes"], info["layers"], resident)
            for resident in (False, True)]
    for row in rows:
        assert row["exit"] == 0 and row["reload_ok"], json.dumps(row)[-2000:]
    assert rows[0]["merges"] and rows[0]["merges"] == rows[1]["merges"]
    assert rows[0]["layers_after"] == rows[1]["layers_after"] < 6
    assert rows[1]["method"] == "laco (resident)"
