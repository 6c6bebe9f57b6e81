"""The calibration bench builds valid recipes: each method's own recipe with the calibration source swapped,
its evaluate/export stages replaced by the shared evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.bench_calibration import _base, _dense, _recipe, table
from pipeline.recipe import validate

SPECS = sorted(Path("recipes/bench").glob("smollm2-calibration*.yaml")) + [Path("recipes/bench/smollm2-damping.yaml")]


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_every_row_of_a_shipped_spec_is_a_valid_recipe(spec_path: Path) -> None:
    spec = yaml.safe_load(spec_path.read_text())
    validate(_dense(_base(next(iter(spec["methods"].values()))), spec["evaluation"]))
    for method, entry in spec["methods"].items():
        base = _base(entry)
        for label, source in spec["calibrations"].items():
            recipe = validate(_recipe(base, f"{method}--{label}", source, spec["evaluation"]))
            kinds = [c.type for c in recipe.stages.values()]
            assert kinds[-1] == "evaluate" and "export" not in kinds and kinds.count("evaluate") == 1
            cal = next(c for c in recipe.stages.values() if c.type == "calibrate")
            assert cal.source.model_dump(mode="json", exclude_defaults=True) == source or "mix" in source or "self_generated" in source


def test_prune_overrides_replace_and_drop_keys() -> None:
    base = _base({"recipe": "recipes/smollm2/shortgpt-6blocks.yaml", "prune": {"num_blocks": None, "ratio": 0.2}})
    prune = base["stages"]["prune"]
    assert prune["ratio"] == 0.2 and "num_blocks" not in prune
    assert validate(base).stages["prune"].ratio == 0.2


def test_table_prints_ratio_to_dense() -> None:
    rows = [{"method": "m", "calibration": "valid", "params": 1.5e6, "ppl": {"a": 20.0}, "ratio": {"a": 2.0}}]
    assert "| m | valid | 1.5M | 20.00 (2.00×) |" in table(rows, ["a"])
