"""Evaluation: the lm-eval local ARC-Easy task on the shared file, speed measurement, report.md plots."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from prunelab.run import main

ROOT = Path(__file__).resolve().parents[1]
ARC = ROOT.parent / "shared" / "data" / "arc" / "arc_easy_test.jsonl"


@pytest.mark.skipif(not ARC.is_file(), reason="shared ARC-Easy file not present")
def test_lm_eval_local_task_loads_the_shared_file(tmp_path):
    """lm-eval itself builds the task from the local JSONL: all 2,376 questions, 4-way choices, targets in range."""
    from prunelab.stages.evaluation.zeroshot import task_manager

    manager, name = task_manager("arc_easy", str(ARC), tmp_path)
    from lm_eval.tasks import get_task_dict

    task = get_task_dict([name], manager)[name]
    docs = list(task.test_docs())
    assert len(docs) == 2376
    assert task.doc_to_text(docs[0]).startswith("Question: ") and task.doc_to_text(docs[0]).endswith("\nAnswer:")
    assert all(0 <= task.doc_to_target(d) < len(task.doc_to_choice(d)) for d in docs)
    first = json.loads(ARC.read_text().splitlines()[0])
    assert task.doc_to_choice(docs[0]) == first["choices"]["text"]


def test_arc_easy_through_lm_eval_on_a_tiny_model(tiny_model):
    from prunelab.stages.evaluation.zeroshot import evaluate_task
    from prunelab.stages.io.tiny import byte_tokenizer

    r = evaluate_task(tiny_model, byte_tokenizer(), "arc_easy", str(ARC), limit=6, batch_size=6)
    assert r["samples"] == 6 and 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
    assert r["lm_eval_version"] and "acc_norm = length-normalised" in r["protocol"]


def test_speed_reports_medians_for_each_batch_size(tiny_model):
    from prunelab.stages.evaluation.speed import measure_speed

    r = measure_speed(tiny_model, prompt_len=8, new_tokens=4, batch_sizes=(1, 2), repeats=2)
    assert set(r["decode_tok_s"]) == {"1", "2"} and all(v > 0 for v in r["decode_tok_s"].values())
    assert r["prefill_ms"]["1"] > 0 and r["peak_memory_mb"] > 0 and "median of 2" in r["protocol"]


def test_paired_speedup_sees_fewer_blocks_decode_faster(monkeypatch):
    """Interleaved pairs: the ratio is taken within each back-to-back pair, so machine drift slower than one pair
    cancels. Behaviour, not timing: the clock is a fake whose decode time is proportional to the blocks a model has,
    times a machine speed that drifts 3× over the run; the paired median must still read exactly 12/3 = 4×, and a model
    against itself exactly 1×, with the order alternating A-B, B-A. (A real, unpatched call is checked for shape only:
    on a loaded shared CPU a timing bound is noise.)"""
    from prunelab.stages.evaluation import speed
    from prunelab.stages.evaluation.speed import measure_speedup
    from prunelab.stages.io.tiny import tiny_llama
    from prunelab.stages.surgery.apply import remove_blocks

    dense = tiny_llama(num_layers=12)
    pruned = copy.deepcopy(dense)
    remove_blocks(pruned, list(range(3, 12)))
    calls: list[int] = []

    def fake_decode(model, ids, new_tokens):
        calls.append(model.config.num_hidden_layers)
        drift = 1.0 + 0.1 * len(calls)  # the machine slows down steadily, 1.1× → 3×
        return 0.0, drift * model.config.num_hidden_layers * new_tokens * 1e-3

    monkeypatch.setattr(speed, "_timed_decode", fake_decode)
    r = measure_speedup(pruned, dense, prompt_len=8, new_tokens=6, batch_sizes=(1,), repeats=5, warmup=0)
    assert calls == [3, 12, 12, 3, 3, 12, 12, 3, 3, 12], "pairs alternate A-B, B-A"
    assert len(r["pair_ratios"]["1"]) == 5 and 3.4 < r["decode_speedup"]["1"] < 4.7, r  # drift within a pair only
    same = measure_speedup(dense, dense, prompt_len=8, new_tokens=6, batch_sizes=(1,), repeats=5, warmup=0)
    assert 0.9 < same["decode_speedup"]["1"] < 1.1, same
    assert "interleaved pairs" in r["protocol"]
    monkeypatch.undo()
    real = measure_speedup(pruned, dense, prompt_len=8, new_tokens=2, batch_sizes=(1,), repeats=2)
    assert len(real["pair_ratios"]["1"]) == 2 and all(x > 0 for x in real["pair_ratios"]["1"])


def test_report_renders_every_plot_for_depth_recovery(tmp_path):
    rc = main(["recipes/debug-recover.yaml", "--output-dir", str(tmp_path), "--no-progress",
               "stages.recover.max_steps=2", "stages.recover.control=true",
               f"stages.eval_pruned.tasks.arc_easy.path={ARC}", "stages.eval_pruned.tasks.arc_easy.limit=4",
               "stages.eval_pruned.speed.new_tokens=3", "stages.eval_pruned.speed.batch_sizes=[1]",
               "stages.eval_pruned.speed.repeats=1"])
    assert rc == 0
    run = tmp_path / "debug-recover"
    for png in ("block_importance", "evaluation", "loss"):
        assert (run / "plots" / f"{png}.png").stat().st_size > 1000
    report = (run / "report.md").read_text()
    assert "plots/loss.png" in report and "| control | tiny |" in report and "acc_norm" in report
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval"]["pruned"]["arc_easy"]["samples"] == 4
    assert "decode_tok_s" in metrics["eval"]["pruned"]["speed"]


def test_report_plots_kept_widths(tmp_path):
    assert main(["recipes/debug-width.yaml", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    run = next(tmp_path.iterdir())
    assert (run / "plots" / "widths.png").stat().st_size > 1000
    assert "plots/widths.png" in (run / "report.md").read_text()


def test_local_file_for_an_unknown_task_is_a_clear_error():
    from prunelab.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="local files are supported for"):
        load_recipe("recipes/debug-recover.yaml", [f"stages.eval_pruned.tasks.hellaswag.path={ARC}"])


def test_report_shows_alphapruning_alpha_per_layer(tmp_path):
    assert main(["recipes/debug-width.yaml", "--output-dir", str(tmp_path), "--no-progress",
                 "stages.prune.allocation=alpha", "stages.prune.compensation=none"]) == 0
    run = next(tmp_path.iterdir())
    report = (run / "report.md").read_text()
    assert (run / "plots" / "alpha.png").stat().st_size > 1000 and "plots/alpha.png" in report
    plan = json.loads(next(run.glob("*-prune/plan.json")).read_text())
    assert len(plan["layer_alpha"]) == 6
    assert f"| 0 | {plan['layer_alpha'][0]:.3f} |" in report


def test_speed_paired_times_the_dense_model_beside_the_pruned_one(tmp_path):
    """``speed: {paired: true}`` on a pruned model: the dense model is reloaded and timed in interleaved pairs with it
    (stages.evaluation.speed.measure_speedup), so a benchmark's speedup does not divide tokens/s measured minutes
    apart; on the dense model itself nothing is paired, and the default leaves the dumped settings unchanged."""
    speed = "{prompt_len: 8, new_tokens: 3, batch_sizes: [1], repeats: 2, warmup: 0, paired: true}"
    assert main(["recipes/debug.yaml", "--output-dir", str(tmp_path), "--no-progress",
                 f"stages.eval_pruned.speed={speed}", f"stages.eval_dense.speed={speed}"]) == 0
    run = tmp_path / "debug"
    pruned = json.loads((run / "06-eval_pruned" / "results.json").read_text())["results"]["speed"]
    dense = json.loads((run / "03-eval_dense" / "results.json").read_text())["results"]["speed"]
    assert "paired" not in dense
    assert len(pruned["paired"]["pair_ratios"]["1"]) == 2 and pruned["paired"]["decode_speedup"]["1"] > 0
    assert "paired with the dense model" in pruned["paired"]["protocol"]
    from prunelab.stages.evaluate import SpeedConfig

    assert "paired" not in SpeedConfig().model_dump()
