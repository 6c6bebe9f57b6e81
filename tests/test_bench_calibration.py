"""The calibration bench builds valid recipes: each method's own recipe with the calibration source swapped,
its evaluate/export stages replaced by the shared evaluation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from prunelab.bench_calibration import _base, _dense, _recipe, main, previous_rows, selected, table
from prunelab.recipe import validate

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
            assert kinds[-1] == "evaluate" and kinds.count("evaluate") == 1
            assert "export" not in kinds and "recover" not in kinds  # pruning only (Shortened LLaMA's recipe recovers)
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


def _old(spec: dict) -> dict:
    row = {"method": "bi", "calibration": "valid", "params": 1, "ppl": {"wikitext2": 20.0, "arc_qa_text": 8.0}, "ratio": {"wikitext2": 2.0, "arc_qa_text": 2.0}}
    dense = {"method": "dense", "calibration": "-", "params": 2, "ppl": {"wikitext2": 10.0, "arc_qa_text": 4.0}, "ratio": {"wikitext2": 1.0, "arc_qa_text": 1.0}}
    gone = {**row, "method": "gone"}
    return {"spec": copy.deepcopy(spec), "protocol": {"a": "p"}, "rows": [dense, row, gone]}


def test_previous_rows_are_reused_only_when_their_definition_is_unchanged() -> None:
    """--previous: an old row counts only if its method entry, its label's source and the evaluation are unchanged."""
    spec = yaml.safe_load(Path("recipes/bench/smollm2-calibration.yaml").read_text())
    old = _old(spec)
    got = previous_rows(spec, old, "old.json")
    assert sorted(got) == [("bi", "valid"), ("dense", "-")] and got[("bi", "valid")]["from"] == "old.json"
    changed = copy.deepcopy(spec)
    changed["methods"]["bi"]["prune"]["ratio"] = 0.25
    assert sorted(previous_rows(changed, old, "old.json")) == [("dense", "-")]
    changed = copy.deepcopy(spec)
    changed["calibrations"]["valid"] = {"path": "other.txt"}
    assert sorted(previous_rows(changed, old, "old.json")) == [("dense", "-")]
    changed = copy.deepcopy(spec)
    changed["evaluation"]["perplexity"]["wikitext2"]["max_tokens"] = 1000
    assert previous_rows(changed, old, "old.json") == {}


def test_rows_select_methods_or_single_rows_and_unknown_names_are_refused(tmp_path: Path) -> None:
    assert selected("bi", "mix", []) and selected("bi", "mix", ["bi"]) and selected("bi", "mix", ["bi--mix"])
    assert not selected("bi", "valid", ["bi--mix"]) and not selected("ppl", "mix", ["bi"])
    with pytest.raises(SystemExit, match=r"--rows: \['bj'\] not in .*methods: flap-optimal"):
        main(["recipes/bench/smollm2-calibration.yaml", "--out", str(tmp_path), "--rows", "bj"])


def test_finished_only_tabulates_previous_rows_without_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no run folders at all, --previous alone rebuilds the table (nothing is run)."""
    spec_path = Path("recipes/bench/smollm2-calibration.yaml")
    old = _old(yaml.safe_load(spec_path.read_text()))
    prev = tmp_path / "old.json"
    prev.write_text(json.dumps(old))
    assert main([str(spec_path), "--out", str(tmp_path), "--previous", str(prev), "--finished-only"]) == 0
    written = json.loads((tmp_path / "smollm2-calibration.json").read_text())
    assert [(r["method"], r["calibration"]) for r in written["rows"]] == [("dense", "-"), ("bi", "valid")]
    assert "| bi | valid |" in capsys.readouterr().out
