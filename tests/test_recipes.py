"""Recipe schema: every shipped recipe validates; bad input fails fast, naming the field and the fix."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prunelab.preflight import preflight
from prunelab.recipe import RecipeError, load_raw, load_recipe, validate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml"))
SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("pipeline/" in first or "prunelab bench" in first), \
        "every recipe opens with the command that runs it"
    assert str(path.relative_to(ROOT)) in first, "the opening command names this very file"
    if "prunelab bench" in first:  # a benchmark spec: every row validated as the recipe it is
        from prunelab.benchmarks.spec import load_bench

        load_bench(path)
        return
    if "pipeline/run.py" not in first:
        load_raw(path)  # read by another script with its own schema: at least a readable YAML mapping
        return
    recipe = load_recipe(path)
    if "shared/data" in path.read_text() and not SHARED.is_dir():
        pytest.skip("shared data not present")
    if recipe.model.source.count("/") == 1 and not Path(recipe.model.source).exists():
        return  # hub id: nothing local to check
    preflight(recipe)


GOOD = {
    "name": "t",
    "model": {"source": "tiny-random-llama"},
    "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 2, "seq_len": 16},
        "score": {"type": "score", "criteria": ["block_influence"]},
        "prune": {"type": "prune", "criterion": "block_influence", "num_blocks": 2},
        "eval": {"type": "evaluate", "perplexity": {"tiny": {"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 32}}},
        "export": {"type": "export"},
    },
}


def _with(path: str, value):
    """GOOD with one dotted key set (value None deletes it)."""
    import copy

    raw = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return raw


RUN_RECIPES = [p for p in RECIPES if "pipeline/run.py" in p.read_text().splitlines()[0]]


@pytest.mark.parametrize("path", RUN_RECIPES, ids=[str(p.relative_to(ROOT)) for p in RUN_RECIPES])
def test_resolved_recipe_keeps_every_stage_setting(path):
    """recipe.resolved.yaml is what a run records of its settings: it must hold every field of every stage (a
    whole-recipe model_dump drops a width/hidden prune's fields: it serialises by the declared union) and
    validate back to the same settings."""
    recipe = load_recipe(path)
    resolved = recipe.resolved()
    for key, cfg in recipe.stages.items():
        assert resolved["stages"][key] == cfg.model_dump(mode="json"), key
    again = validate(yaml.safe_load(yaml.safe_dump(resolved, sort_keys=False)))
    assert {k: c.model_dump(mode="json") for k, c in again.stages.items()} == resolved["stages"]


def test_good_recipe_is_valid_and_ordered():
    recipe = validate(GOOD)
    preflight(recipe)
    assert list(recipe.stages) == ["calibrate", "score", "prune", "eval", "export"]


BAD = [
    # (what is wrong, raw recipe, text the message must contain)
    ("unknown stage type", _with("stages.score.type", "scoer"), "stages.score.type: unknown stage type 'scoer' (did you mean 'score'?)"),
    ("missing stage type", _with("stages.score.type", None), "every stage needs `type:`"),
    ("misspelled key in a stage", _with("stages.prune.num_blocs", 2), "stages.prune.num_blocs: unknown key; did you mean 'num_blocks'?"),
    ("misspelled top-level key", _with("sed", 1), "sed: unknown key; did you mean 'seed'?"),
    ("misspelled nested key", _with("stages.calibrate.source.pth", "x.txt"), "stages.calibrate.source.pth: unknown key; did you mean 'path'?"),
    ("ratio above 1", _with("stages.prune", {"type": "prune", "criterion": "ppl", "ratio": 1.5}), "stages.prune.ratio"),
    ("ratio zero", _with("stages.prune", {"type": "prune", "criterion": "ppl", "ratio": 0}), "stages.prune.ratio"),
    ("ratio negative", _with("stages.prune", {"type": "prune", "criterion": "ppl", "ratio": -0.2}), "stages.prune.ratio"),
    ("two targets", _with("stages.prune.ratio", 0.2), "give exactly one target"),
    ("no target", _with("stages.prune.num_blocks", None), "give exactly one target"),
    ("unknown criterion", _with("stages.prune.criterion", "bi"), "unknown blocks criterion 'bi'; choose from"),
    ("unknown criterion in score", _with("stages.score.criteria", ["angular"]), "stages.score: unknown blocks criterion 'angular'; choose from"),
    ("prune before score", {**GOOD, "stages": {k: GOOD["stages"][k] for k in ("prune", "calibrate", "score")}}, "needs a `score` stage with units: blocks before it"),
    ("score without calibration", {**GOOD, "stages": {k: GOOD["stages"][k] for k in ("score", "prune")}}, "need calibration data"),
    ("missing model", _with("model", None), "model: required field is missing"),
    ("bad dtype", _with("model.dtype", "fp8"), "model.dtype"),
    ("two data sources", _with("stages.calibrate.source.dataset", "wikitext"), "exactly one of `dataset`"),
    ("unsupported file type", _with("stages.calibrate.source.path", "data.csv"), "only .txt and .jsonl"),
    ("budget below one window", _with("stages.eval.perplexity.tiny.max_tokens", 8), "less than one window"),
    ("non-positive samples", _with("stages.calibrate.num_samples", 0), "stages.calibrate.num_samples"),
    ("bad stage name", _with("stages.bad name", {"type": "export"}), "stage names use letters"),
]

PREFLIGHT_BAD = [
    ("more blocks than exist", _with("stages.prune.num_blocks", 40), "num_blocks=40 but the model has 6 blocks; choose at most 5"),
    ("missing data file", _with("stages.calibrate.source.path", "nope/missing.txt"), "stages.calibrate.source.path: file 'nope/missing.txt' not found"),
    ("unreadable model path", _with("model.source", "./no/such/model"), "model.source: './no/such/model' is not a readable model folder"),
    ("folder without config", _with("model.source", "tests/data"), "has no config.json"),
    ("missing gguf", _with("model.source", "./missing.gguf"), "GGUF file './missing.gguf' not found"),
    ("nonsense model id", _with("model.source", "not-a-model"), "neither an existing path, a hub id"),
]


def test_evaluate_with_nothing_named_runs_the_two_domain_suite():
    """An evaluate stage that names nothing gets WikiText-2 test, the ARC question-answer text and ARC-Easy in full."""
    from prunelab.stages.evaluation.suite import DEFAULT_SUITE

    recipe = validate(_with("stages.eval", {"type": "evaluate"}))
    ev = recipe.stages["eval"]
    assert sorted(ev.perplexity) == ["arc_qa_text", "wikitext2"] and sorted(ev.tasks) == ["arc_easy"]
    assert ev.tasks["arc_easy"].limit is None  # all 2,376 questions
    assert ev.perplexity["arc_qa_text"].source.describe() == "qa_text:" + DEFAULT_SUITE["perplexity"]["arc_qa_text"]["source"]["qa_text"]
    named = validate(GOOD).stages["eval"]
    assert list(named.perplexity) == ["tiny"] and not named.tasks  # a recipe's own settings replace the suite


def test_a_tweak_of_a_suite_entry_keeps_the_suite():
    """`perplexity.wikitext2.max_tokens=1024` on an evaluate stage that names nothing shrinks that entry only."""
    from prunelab.stages.evaluation.suite import DEFAULT_SUITE

    ev = validate(_with("stages.eval", {"type": "evaluate", "perplexity": {"wikitext2": {"max_tokens": 1024}},
                                        "tasks": {"arc_easy": {"limit": 10}}})).stages["eval"]
    assert sorted(ev.perplexity) == ["arc_qa_text", "wikitext2"] and sorted(ev.tasks) == ["arc_easy"]
    assert ev.perplexity["wikitext2"].max_tokens == 1024 and ev.tasks["arc_easy"].limit == 10
    assert ev.perplexity["wikitext2"].source.describe().endswith(DEFAULT_SUITE["perplexity"]["wikitext2"]["source"]["path"])
    assert ev.perplexity["arc_qa_text"].max_tokens == DEFAULT_SUITE["perplexity"]["arc_qa_text"].get("max_tokens")
    # next to an entry with its own data, a suite-named tweak still gets the suite's data; the rest is not added
    mixed = validate(_with("stages.eval", {"type": "evaluate", "perplexity": {
        "wikitext2": {"max_tokens": 1024}, "mine": {"source": {"path": "tests/data/tiny_corpus.txt"}}}})).stages["eval"]
    assert sorted(mixed.perplexity) == ["mine", "wikitext2"] and not mixed.tasks
    assert mixed.perplexity["wikitext2"].max_tokens == 1024


@pytest.mark.parametrize("why,raw,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_schema(why, raw, expected):
    with pytest.raises(RecipeError) as exc:
        validate(raw)
    assert expected in str(exc.value), str(exc.value)


@pytest.mark.parametrize("why,raw,expected", PREFLIGHT_BAD, ids=[b[0] for b in PREFLIGHT_BAD])
def test_bad_recipe_preflight(why, raw, expected):
    with pytest.raises(RecipeError) as exc:
        preflight(validate(raw))
    assert expected in str(exc.value), str(exc.value)


def test_all_errors_reported_at_once():
    raw = _with("stages.prune.num_blocs", 2)
    raw["stages"]["calibrate"]["num_samples"] = -1
    raw["sed"] = 3
    with pytest.raises(RecipeError) as exc:
        validate(raw)
    assert len(exc.value.problems) == 3


def test_cli_overrides_merge_over_yaml():
    recipe = load_recipe(ROOT / "recipes/debug.yaml", ["stages.prune.num_blocks=3", "seed=7"])
    assert recipe.stages["prune"].num_blocks == 3 and recipe.seed == 7
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(ROOT / "recipes/debug.yaml", ["stages.prune.num_blocks"])


@pytest.mark.parametrize("case", ["typo", "blocks", "ratio", "file", "model", "name", "ratio-blocks", "seq_len", "latin-1"])
def test_cli_fails_fast_before_loading(tmp_path, case):
    raw = yaml.safe_load((ROOT / "recipes/debug.yaml").read_text())
    if case == "typo":
        raw["stages"]["prune"]["critrion"] = raw["stages"]["prune"].pop("criterion")
    elif case == "blocks":
        raw["stages"]["prune"]["num_blocks"] = 99
    elif case == "ratio":
        raw["stages"]["prune"] = {"type": "prune", "criterion": "ppl", "ratio": 1.2}
    elif case == "file":
        raw["stages"]["calibrate"]["source"]["path"] = "missing.txt"
    elif case == "name":
        raw["name"] = "../../escaped"
    elif case == "ratio-blocks":
        raw["stages"]["prune"] = {"type": "prune", "criterion": "ppl", "ratio": 0.99}
    elif case == "seq_len":
        raw["stages"]["calibrate"]["seq_len"] = 99999
    elif case == "model":
        raw["model"]["source"] = "/nonexistent/model"
    path = tmp_path / "bad.yaml"
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    path.write_bytes(text.replace("name: debug", "name: débug").encode("latin-1") if case == "latin-1" else text.encode())
    # the child's CPU seconds (user + system), not wall time: beside a benchmark on 2 cores the wall clock measures
    # the neighbours, not the work prunelab does before refusing
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "pipeline/run.py", str(path)], check=False, cwd=ROOT, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 2, proc.stderr
    assert "invalid recipe" in proc.stderr
    expected = {"typo": "stages.prune.critrion: unknown key; did you mean 'criterion'?",
                "blocks": "stages.prune: num_blocks=99 but the model has 6 blocks",
                "ratio": "stages.prune.ratio", "file": "stages.calibrate.source.path: file 'missing.txt' not found",
                "model": "model.source: '/nonexistent/model' is not a readable model folder",
                "name": "name: '../../escaped' is not a plain folder name", "ratio-blocks": "of 6 blocks",
                "seq_len": "stages.calibrate.seq_len: 99999 tokens exceed the model's context",
                "latin-1": "is not UTF-8: byte 0xe9 on line"}[case]
    assert expected in proc.stderr, proc.stderr
    assert elapsed < 2.0, f"bad input took {elapsed:.2f} CPU s to report"


def test_dry_run_loads_nothing():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "pipeline/run.py", "recipes/debug.yaml", "--dry-run"],
        check=False, cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "05-prune" in proc.stdout and "recipe is valid" in proc.stdout
    assert "| torch\n" not in proc.stderr and " torch\n" not in proc.stderr, "dry run must not import torch"
