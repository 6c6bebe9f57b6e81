"""lm-eval for any task: metrics read from what the task reports (acc-only tasks such as BoolQ / WinoGrande used to
raise KeyError on acc_norm), task names checked at --dry-run with a close match, and the zeroshot_suite preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prunelab.stages.evaluation.zeroshot import read_metrics


def test_read_metrics_takes_what_the_task_reports():
    boolq = {"alias": "boolq", "acc,none": 0.62, "acc_stderr,none": 0.0085}
    assert read_metrics(boolq) == {"acc": 0.62, "acc_stderr": 0.0085}
    gsm = {"alias": "gsm8k", "exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
           "exact_match,flexible-extract": 0.2, "exact_match_stderr,flexible-extract": "N/A"}
    assert read_metrics(gsm) == {"exact_match,strict-match": 0.1, "exact_match,strict-match_stderr": 0.01,
                                 "exact_match,flexible-extract": 0.2, "exact_match,flexible-extract_stderr": None}


def _yes_no_task(folder: Path) -> str:
    """A BoolQ-shaped task over a local JSONL that reports ``acc`` only (as lm-eval's boolq/default.yaml)."""
    rows = [{"passage": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}.", "question": f"is {i} even",
             "label": int(i % 2 == 0)} for i in range(8)]
    (folder / "yesno.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = {"task": "tiny_yesno", "dataset_path": "json", "dataset_kwargs": {"data_files": {"train": str(folder / "yesno.jsonl")}},
            "output_type": "multiple_choice", "test_split": "train",
            "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
            "doc_to_choice": ["no", "yes"], "metric_list": [{"metric": "acc"}], "metadata": {"version": 1.0}}
    (folder / "tiny_yesno.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return "tiny_yesno"


def test_acc_only_task_through_lm_eval(tiny_model, tmp_path):
    """An acc-only local task end to end through lm-eval on the tiny model: acc and its stderr, no acc_norm, and the
    one-line description (CLI summary, report, card) does not ask for acc_norm."""
    from prunelab.stages.evaluation.describe import describe_result
    from prunelab.stages.evaluation.zeroshot import evaluate_task
    from prunelab.stages.io.tiny import byte_tokenizer

    name = _yes_no_task(tmp_path)
    r = evaluate_task(tiny_model, byte_tokenizer(), name, None, limit=None, batch_size=4, include_path=tmp_path)
    assert r["metrics"] == ["acc"] and "acc_norm" not in r
    assert 0.0 <= r["acc"] <= 1.0 and isinstance(r["acc_stderr"], float) and r["samples"] == 8
    assert describe_result(r).startswith("acc ") and "acc_norm" not in describe_result(r)


@pytest.fixture
def task_cache(tmp_path, monkeypatch):
    """A prebuilt task index in a private cache (what the first check writes), so the test never builds lm-eval's."""
    from prunelab.stages.evaluation.zeroshot import _index_file, _lm_eval_version

    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    index = {"arc_easy": "allenai/ai2_arc", "arc_challenge": "allenai/ai2_arc", "boolq": "aps/super_glue", "mmlu": None}
    path = _index_file(_lm_eval_version())
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(index))
    return tmp_path


def _recipe(tasks: object):
    from prunelab.recipe import validate

    return validate({"name": "t", "model": {"source": "tiny-random-llama"},
                     "stages": {"eval": {"type": "evaluate", "tasks": tasks}}})


def test_task_names_checked_with_a_close_match(task_cache, monkeypatch):
    from prunelab.stages.evaluation.zeroshot import recipe_task_problems

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    problems = recipe_task_problems(_recipe({"arc_eazy": {}, "boolq": {}}))
    assert problems == [problems[0]] and "stages.eval.tasks.arc_eazy" in problems[0] and "did you mean 'arc_easy'" in problems[0]


def test_offline_task_without_cached_data_is_refused(task_cache, monkeypatch):
    from prunelab.stages.evaluation.zeroshot import recipe_task_problems

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (task_cache / "hub" / "datasets--allenai--ai2_arc").mkdir(parents=True)  # ARC cached, super_glue not
    problems = recipe_task_problems(_recipe({"arc_challenge": {}, "boolq": {}}))
    assert len(problems) == 1 and "boolq" in problems[0] and "aps/super_glue" in problems[0]


def test_dry_run_reports_the_misspelled_task(task_cache, capsys):
    from prunelab.run import main

    assert main(["recipes/debug.yaml", "--dry-run", "stages.eval_pruned.tasks.arc_eazy.limit=3"]) == 2
    assert "did you mean 'arc_easy'" in capsys.readouterr().err


def test_zeroshot_suite_preset(task_cache):
    from prunelab.stages.evaluation.zeroshot import ZEROSHOT_SUITE, suite_availability

    recipe = _recipe("zeroshot_suite")
    assert list(recipe.stages["eval"].tasks)[:1] == ["arc_easy"]
    assert set(recipe.stages["eval"].tasks) == set(ZEROSHOT_SUITE) == {
        "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa"}
    (task_cache / "hub" / "datasets--aps--super_glue").mkdir(parents=True)
    where = suite_availability({"boolq": {}, "arc_challenge": {}, "nope": {}})
    assert "in the local cache" in where["boolq"] and "needs a download" in where["arc_challenge"]
    assert where["nope"] == "unknown to lm-eval"
    from prunelab.recipe import RecipeError

    with pytest.raises(RecipeError, match="zeroshot_suite"):
        _recipe("zeroshot_suit")
