"""``python -m prunelab.benchmarks.local_recovery``'s pieces, without running children: each variant's recipe is the
reference run's recipe up to its pruned evaluation (so ``--resume`` restores those stages) plus its own stages, and
validates; a bad reference or setting fails before anything runs; KD's wall-clock target is read from a running
reconstruction's block records. (The whole script ran on a tiny finished run: see docs/recovery.md.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from prunelab.benchmarks import local_recovery as lr

RAW = {
    "name": "ref", "seed": 0, "output_dir": "/somewhere", "model": {"source": "tiny-random-llama"},
    "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 4,
                      "seq_len": 32},
        "eval_dense": {"type": "evaluate", "perplexity": {"tiny": {"source": {"path": "tests/data/tiny_corpus.txt"},
                                                                   "seq_len": 64, "max_tokens": 4096}}},
        "score": {"type": "score", "units": "width", "criteria": ["flap"]},
        "prune": {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.2, "compensation": "optimal"},
        "eval_pruned": {"type": "evaluate", "perplexity": {"tiny": {"source": {"path": "tests/data/tiny_corpus.txt"},
                                                                    "seq_len": 64, "max_tokens": 4096}},
                        "tasks": {"arc_easy": {"path": "x.jsonl"}}},
        "export": {"type": "export"},
    },
}


def _run(tmp_path: Path, raw: dict | None = None, evals: tuple[str, ...] = ("dense", "pruned")) -> Path:
    run = tmp_path / "ref"
    run.mkdir(parents=True)
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(raw or RAW, sort_keys=False))
    (run / "metrics.json").write_text(json.dumps({"eval": {k: {"tiny": {"ppl": 10.0}} for k in evals}}))
    return run


def test_variant_recipes_keep_the_reference_chain_and_validate(tmp_path: Path) -> None:
    raw, _, keep = lr.reference(_run(tmp_path))
    assert keep == ["calibrate", "eval_dense", "score", "prune", "eval_pruned"]  # export dropped
    rec = lr.variant_recipe(raw, keep, "reconstruct", dict(lr.BEST), None, None)
    assert list(rec["stages"]) == [*keep, "reconstruct", "eval_recovered"]
    assert all(rec["stages"][k] == RAW["stages"][k] for k in keep) and "output_dir" not in rec
    assert rec["stages"]["eval_recovered"]["tasks"] == {}  # perplexity only
    assert rec["stages"]["eval_recovered"]["perplexity"]["tiny"]["max_tokens"] == 4096
    kd = lr.variant_recipe(raw, keep, "kd", dict(lr.BEST), 20, 1024)
    assert kd["stages"]["recover"]["loop"]["max_steps"] == 20 and kd["stages"]["recover"]["optimizer"]["warmup_steps"] == 2
    assert kd["stages"]["eval_recovered"]["perplexity"]["tiny"]["max_tokens"] == 1024
    both = lr.variant_recipe(raw, keep, "reconstruct+kd", dict(lr.BEST), 5, None)
    assert list(both["stages"])[-3:] == ["reconstruct", "recover", "eval_recovered"]
    assert list(lr.variant_recipe(raw, keep, "kd-probe", dict(lr.BEST), 3, None)["stages"])[-1] == "recover"
    assert list(lr.variant_recipe(raw, keep, "dense", dict(lr.BEST), None, 512)["stages"]) == ["eval_dense_cut"]
    assert list(lr.variant_recipe(raw, keep, "pruned", dict(lr.BEST), None, None)["stages"]) == keep
    for name, recipe in {"rec": rec, "kd": kd, "both": both}.items():
        lr.validate(recipe, tmp_path / name / "recipe.yaml")  # prunelab's own validation accepts each
    with pytest.raises(lr.BenchError, match="KD step count"):
        lr.variant_recipe(raw, keep, "kd", dict(lr.BEST), None, None)


def test_bad_reference_or_settings_fail_before_any_child(tmp_path: Path) -> None:
    depth = json.loads(json.dumps(RAW))
    depth["stages"]["prune"] = {"type": "prune", "criterion": "block_influence", "num_blocks": 1}
    with pytest.raises(lr.BenchError, match="width prune"):
        lr.reference(_run(tmp_path, depth))
    with pytest.raises(lr.BenchError, match="no recipe.resolved.yaml"):
        lr.reference(tmp_path)
    with pytest.raises(lr.BenchError, match="lacks the dense or pruned"):
        lr.reference(_run(tmp_path / "b", evals=("dense",)))
    with pytest.raises(lr.BenchError, match="KEY=VALUE"):
        lr.parse_override("lr")
    assert lr.parse_override("lr=3e-4") == ("lr", 3e-4) and lr.parse_override("loss=token") == ("loss", "token")
    with pytest.raises(lr.BenchError, match="--reconstruct"):
        lr.main(["--from-run", str(_run(tmp_path / "c")), "--work", str(tmp_path / "w"),
                 "--reconstruct", "loss=huber"])
    with pytest.raises(lr.BenchError, match="not a reconstruct stage folder"):
        lr.match_seconds(tmp_path / "nowhere", 2)


def test_match_seconds_extrapolates_running_blocks_or_reads_done(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "01-load").mkdir(parents=True)
    (run / "01-load" / "done.json").write_text(json.dumps({"outputs": {"layers_before": 30}}))
    stage = run / "07-reconstruct"
    (stage / "blocks").mkdir(parents=True)
    for i, s in enumerate([10.0, 20.0, 30.0]):
        (stage / "blocks" / f"block-{i:03d}.json").write_text(json.dumps({"seconds": s}))
    assert lr.match_seconds(stage, 3) == pytest.approx(20.0 * 30)
    (stage / "done.json").write_text(json.dumps({"seconds": 123.4}))
    assert lr.match_seconds(stage, 3) == 123.4


def test_table_and_stage_seconds(tmp_path: Path) -> None:
    for name, s in {"07-reconstruct": 100.0, "08-recover": 50.0, "09-eval_recovered": 999.0}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "done.json").write_text(json.dumps({"seconds": s}))
    assert lr.stage_seconds(tmp_path, ("reconstruct", "recover")) == 150.0
    dense = {"tiny": {"ppl": 10.0}}
    rows = [{"label": "pruned", "ppl": lr.ppl_row({"tiny": {"ppl": 15.0, "protocol": "p"}}, dense)},
            {"label": "kd", "ppl": lr.ppl_row({"tiny": {"ppl": 12.0}}, dense), "tokens": 4096, "seconds": 61.2}]
    text = lr.table(rows, ["tiny"])
    assert "| pruned | 15.00 (1.50×) | – | – |" in text and "| kd | 12.00 (1.20×) | 4,096 | 61 |" in text
