"""The calibration bench as rows of recipes: each method's own recipe with the calibration source swapped, its
evaluate / export / recover stages replaced by the shared evaluation; a malformed spec is refused by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prunelab.benchmarks.cli import main
from prunelab.benchmarks.spec import BenchError, load_bench
from prunelab.benchmarks.tables import Method, _ratio_table

SPECS = sorted(Path("recipes/bench").glob("smollm2-calibration*.yaml")) + [Path("recipes/bench/smollm2-damping.yaml")]


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_every_row_of_a_shipped_spec_is_a_valid_recipe(spec_path: Path) -> None:
    spec = yaml.safe_load(spec_path.read_text())
    bench = load_bench(spec_path)  # every row validated as the recipe it is
    assert bench.kind == "calibration" and bench.rows[0].name == "dense"
    assert len(bench.rows) == 1 + len(spec["methods"]) * len(spec["calibrations"])
    for row, recipe in zip(bench.rows[1:], bench.recipes()[1:]):
        kinds = [c.type for c in recipe.stages.values()]
        assert kinds[-1] == "evaluate" and kinds.count("evaluate") == 1
        assert "export" not in kinds and "recover" not in kinds  # pruning only (Shortened LLaMA's recipe recovers)
        source = spec["calibrations"][row.meta["calibration"]]
        cal = next(c for c in recipe.stages.values() if c.type == "calibrate")
        assert cal.source.model_dump(mode="json", exclude_defaults=True) == source or "mix" in source or "self_generated" in source


def test_prune_overrides_replace_and_drop_keys() -> None:
    base = Method(recipe="recipes/smollm2/shortgpt-6blocks.yaml", prune={"num_blocks": None, "ratio": 0.2}).load()
    prune = base["stages"]["prune"]
    assert prune["ratio"] == 0.2 and "num_blocks" not in prune


def test_table_prints_ratio_to_dense() -> None:
    rows = [{"method": "m", "calibration": "valid", "params": 1.5e6, "ppl": {"a": 20.0}, "ratio": {"a": 2.0}}]
    assert "| m | valid | 1.5M | 20.00 (2.00×) |" in _ratio_table(rows, ["method", "calibration"])


def test_a_malformed_spec_or_unknown_row_is_refused_by_name(tmp_path: Path) -> None:
    spec = yaml.safe_load(Path("recipes/bench/smollm2-calibration.yaml").read_text())
    spec["methods"]["bi"]["prnue"] = {"ratio": 0.1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(BenchError, match=r"methods\.bi\.prnue"):
        load_bench(tmp_path / "c.yaml")
    assert main(["recipes/bench/smollm2-calibration.yaml", "--output-dir", str(tmp_path), "--rows", "bj"]) == 2
    assert not (tmp_path / "smollm2-calibration").exists()


def test_a_tiny_calibration_bench_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two calibration texts × one method on the tiny model; ``--rows`` runs one row, the rest come later."""
    text = "tests/data/tiny_corpus.txt"
    half = tmp_path / "half.txt"
    half.write_text(Path(text).read_text()[: len(Path(text).read_text()) // 2])
    spec = {"methods": {"width": "recipes/debug-width.yaml"},
            "calibrations": {"all": {"path": text}, "half": {"path": str(half)}},
            "evaluation": {"perplexity": {"tiny": {"source": {"path": text}, "seq_len": 64, "max_tokens": 512}}}}
    path = tmp_path / "tiny-cal.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--output-dir", str(tmp_path), "--rows", "width--all"]) == 0
    first = json.loads((tmp_path / "tiny-cal" / "bench.json").read_text())
    assert [(r["method"], r["calibration"]) for r in first["rows"]] == [("dense", "-"), ("width", "all")]  # + dense: the ratios
    assert main([str(path), "--output-dir", str(tmp_path), "--resume"]) == 0
    got = json.loads((tmp_path / "tiny-cal" / "bench.json").read_text())
    assert [(r["method"], r["calibration"]) for r in got["rows"]] == [("dense", "-"), ("width", "all"), ("width", "half")]
    assert got["rows"][0]["ratio"] == {"tiny": 1.0} and got["rows"][1]["ppl"] != got["rows"][2]["ppl"]
    assert "| width | half |" in capsys.readouterr().out
