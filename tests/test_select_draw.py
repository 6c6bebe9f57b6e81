"""Choosing a calibration draw (``prunelab bench RECIPE --seeds``): seeds parse and are refused when malformed, each
seed's row keeps the pruning stages and adds the held-out and reported evaluations, selection never reads a test
split, and the chosen seed is the one with the lowest held-out perplexity (end to end on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunelab.benchmarks.cli import main
from prunelab.benchmarks.spec import BenchError, build
from prunelab.benchmarks.tables import compile_select_draw, parse_seeds

TINY = "tests/data/tiny_corpus.txt"


def test_seeds_parse_ranges_and_lists() -> None:
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5, 42") == [1, 5, 42]
    assert parse_seeds("0-1,7") == [0, 1, 7]
    for bad in ("3", "2-1", "1,1"):
        with pytest.raises(BenchError):
            parse_seeds(bad)


def test_the_seed_recipe_prunes_as_written_then_evaluates_twice() -> None:
    bench = build(compile_select_draw("recipes/debug-width.yaml", [3, 4], TINY, 1024, 128))
    row, recipe = bench.rows[0], bench.recipes()[0]
    assert recipe.seed == 3 and row.name == "debug-width--seed3"
    assert [c.type for c in recipe.stages.values()] == ["calibrate", "score", "prune", "evaluate", "evaluate"]
    assert row.recipe["stages"]["holdout"]["perplexity"] == {"holdout": {"source": {"path": TINY}, "seq_len": 128,
                                                                         "max_tokens": 1024}}
    with pytest.raises(BenchError, match="one-shot"):
        compile_select_draw("recipes/debug-recover.yaml", [0, 1], TINY)


def test_selection_refuses_a_test_split(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="test split"):
        compile_select_draw("recipes/debug-width.yaml", [0, 1], "../shared/data/wikitext2/test.txt")
    assert main(["recipes/debug-width.yaml", "--seeds", "0-1", "--holdout", "x/test.txt", "--output-dir", str(tmp_path)]) == 2


def test_the_chosen_seed_has_the_lowest_held_out_perplexity(tmp_path: Path) -> None:
    assert main(["recipes/debug-width.yaml", "--seeds", "0-1", "--holdout", TINY, "--holdout-tokens", "1024",
                 "--seq-len", "128", "--output-dir", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "debug-width--select-draw" / "bench.json").read_text())
    assert [d["seed"] for d in got["draws"]] == [0, 1]
    assert got["chosen_seed"] == min(got["draws"], key=lambda d: d["holdout"])["seed"]
    assert all(set(d["reported"]) == {"tiny"} for d in got["draws"])
    assert got["draws"][0]["holdout"] != got["draws"][1]["holdout"]  # the draws differ, so the choice means something
