"""select_draw: seeds parse and are refused when malformed, the per-seed recipe keeps the pruning stages and adds
the held-out and reported evaluations, selection never reads a test split, and the chosen seed is the one with the
lowest held-out perplexity (end to end on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prunelab.recipe import validate
from prunelab.select_draw import draw_recipe, main, parse_seeds

HOLDOUT = {"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 128, "max_tokens": 1024}


def test_seeds_parse_ranges_and_lists() -> None:
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5, 42") == [1, 5, 42]
    assert parse_seeds("0-1,7") == [0, 1, 7]
    for bad in ("3", "2-1", "1,1"):
        with pytest.raises(SystemExit):
            parse_seeds(bad)


def test_the_seed_recipe_prunes_as_written_then_evaluates_twice() -> None:
    base = yaml.safe_load(Path("recipes/debug-width.yaml").read_text())
    r = draw_recipe(base, 3, HOLDOUT)
    assert r["seed"] == 3 and r["name"] == "debug-width--seed3"
    types = [c["type"] for c in r["stages"].values()]
    assert types == ["calibrate", "score", "prune", "evaluate", "evaluate"]  # eval_dense and export dropped
    assert r["stages"]["holdout"]["perplexity"] == {"holdout": HOLDOUT}
    assert r["stages"]["eval"]["perplexity"] == base["stages"]["eval_pruned"]["perplexity"]
    validate(r)
    healed = yaml.safe_load(Path("recipes/debug-recover.yaml").read_text())
    with pytest.raises(SystemExit, match="one-shot"):
        draw_recipe(healed, 0, HOLDOUT)


def test_selection_refuses_a_test_split(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="test split"):
        main(["recipes/debug-width.yaml", "--seeds", "0-1", "--holdout", "../shared/data/wikitext2/test.txt",
              "--out", str(tmp_path)])


def test_the_chosen_seed_has_the_lowest_held_out_perplexity(tmp_path: Path) -> None:
    assert main(["recipes/debug-width.yaml", "--seeds", "0-1", "--holdout", "tests/data/tiny_corpus.txt",
                 "--holdout-tokens", "1024", "--seq-len", "128", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "select-draw.json").read_text())
    assert [d["seed"] for d in got["draws"]] == [0, 1]
    assert got["chosen_seed"] == min(got["draws"], key=lambda d: d["holdout"])["seed"]
    assert all(set(d["reported"]) == {"tiny"} for d in got["draws"])
    assert got["draws"][0]["holdout"] != got["draws"][1]["holdout"]  # the draws differ, so the choice means something
