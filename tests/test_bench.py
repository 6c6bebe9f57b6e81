"""The benchmark script on a tiny model: every row present, JSON + Markdown written, README updated."""

from __future__ import annotations

import json

import yaml

from prunelab.bench import main


def test_bench_depth_and_width_rows(tmp_path):
    recipe = {
        "name": "tiny-bench", "seed": 0, "output_dir": str(tmp_path), "model": {"source": "tiny-random-llama"},
        "calibration": {"source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 3, "seq_len": 32},
        "perplexity": {"tiny": {"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 64, "max_tokens": 512}},
        "criteria": ["block_influence", "ppl", "sleb", "laco", "random"],
        "laco": {"merge_layers": 2, "threshold": -1.0},
        "targets": [{"num_blocks": 2}, {"ratio": 0.2}],
        "width_ratio": 0.15,
        "width": [{"criterion": "flap", "allocation": "global", "compensation": "bias"}, {"criterion": "taylor"},
                  {"criterion": "flap", "allocation": "alpha", "compensation": "bias"},
                  {"criterion": "wanda_sp", "compensation": "optimal", "label": "wanda-opt"},
                  {"criterion": "taylor", "units": "hidden", "label": "taylor-hidden"}],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench:tiny-bench:start -->\nold\n<!-- bench:tiny-bench:end -->\nafter\n")
    assert main([str(path), "--update-readme", str(readme)]) == 0
    report = json.loads((tmp_path / "tiny-bench" / "bench.json").read_text())
    assert len(report["rows"]) == 1 + 5 * 2 + 5
    laco = [r for r in report["rows"] if r["criterion"] == "laco"]
    assert len(laco) == 2 and len(laco[0]["removed_blocks"]) == 2  # re-scored per target: merges depend on it
    assert laco[1]["layers"] == 6 - len(laco[1]["removed_blocks"])
    opt = next(r for r in report["rows"] if r["criterion"] == "wanda-opt")
    alpha = next(r for r in report["rows"] if r["criterion"].startswith("flap (alpha"))
    assert opt["score_s"] > 0 and opt["plan_s"] > 0 and alpha["uniform"] is False
    hidden = next(r for r in report["rows"] if r["criterion"] == "taylor-hidden")
    assert hidden["uniform"] and abs(hidden["achieved_ratio"] - 0.15) < 0.04  # whole multiples of 4 heads
    assert report["rows"][0]["criterion"] == "dense"
    assert report["ppl_cost_ratio"]["max_rel_diff"] < 1e-5
    assert all(r["eval"]["tiny"]["seq_len"] == 64 for r in report["rows"])
    sleb6 = next(r for r in report["rows"] if r["criterion"] == "sleb" and r["target"] == "2 blocks")
    assert len(sleb6["removed_blocks"]) == 2
    text = readme.read_text()
    assert "old" not in text and "| tiny-bench" not in text and "flap" in text and text.endswith("after\n")


def test_bench_with_two_windows_arc_and_decode_speedup(tmp_path):
    """The issue-5 columns: PPL at 128 and at 512 windows, ARC-Easy acc/acc_norm via lm-eval, decode speedup."""
    from pathlib import Path

    arc = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc" / "arc_easy_test.jsonl"
    text = {"path": "tests/data/tiny_corpus.txt"}
    recipe = {
        "name": "tiny-bench2", "seed": 0, "output_dir": str(tmp_path), "model": {"source": "tiny-random-llama"},
        "calibration": {"source": text, "num_samples": 3, "seq_len": 32},
        "perplexity": {"ppl128": {"source": text, "seq_len": 128, "max_tokens": 1024},
                       "ppl512": {"source": text, "seq_len": 512, "max_tokens": 1024}},
        "tasks": {"arc_easy": {"path": str(arc), "limit": 4, "batch_size": 4}},
        "speed": {"prompt_len": 8, "new_tokens": 3, "batch_sizes": [1, 2], "repeats": 1},
        "criteria": ["block_influence"], "targets": [{"num_blocks": 2}], "cost_ratio": False,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main([str(path)]) == 0
    report = json.loads((tmp_path / "tiny-bench2" / "bench.json").read_text())
    row = report["rows"][1]
    assert row["eval"]["ppl128"]["seq_len"] == 128 and row["eval"]["ppl512"]["seq_len"] == 512
    assert row["eval"]["arc_easy"]["samples"] == 4 and "acc_norm" in row["eval"]["arc_easy"]
    assert set(row["eval"]["speed"]["decode_tok_s"]) == {"1", "2"}
    assert set(row["eval"]["speed"]["paired"]["decode_speedup"]) == {"1", "2"} and "paired" not in report["rows"][0]["eval"]["speed"]
    md = (tmp_path / "tiny-bench2" / "bench.md").read_text()
    assert "ppl128 PPL (seq 128; × dense)" in md and "ppl512 PPL (seq 512; × dense)" in md and "arc_easy acc_norm" in md
    dense_line = next(line for line in md.splitlines() if "| dense |" in line)
    assert dense_line.count("(1.00×)") == 2  # every perplexity carries its ratio to the dense row
    assert "decode speedup (bs 1/2)" in md and "(ideal " in md and "interleaved pairs" in md and any(c.endswith("sha256 ok") for c in report["checksums_verified"])


def test_a_bench_row_with_the_official_llm_pruner_options_makes_the_recipe_s_plan(tmp_path):
    """Bench calibration `sampling: llm_pruner` and a width row's own criterion `settings`: the row removes exactly
    what the pipeline removes with the same options, and differs from the row without the settings' scoring."""
    from prunelab.run import main as run_main

    opts = {"criterion": "taylor", "layer_ratio": 0.5, "allocation": {"type": "uniform", "counts": "llm_pruner"},
            "layers": [1, 5], "attention": "kv_group"}
    taylor = {"reduction": "sum", "grouping": "llm_pruner"}
    bench = {
        "name": "tiny-llmp", "seed": 3, "output_dir": str(tmp_path), "model": {"source": "tiny-random-llama"},
        "calibration": {"source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 4, "seq_len": 32,
                        "sampling": "llm_pruner"},
        "perplexity": {"tiny": {"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 64, "max_tokens": 512}},
        "width": [{**opts, "settings": taylor, "label": "official"}, {**opts, "label": "units"}],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(bench, sort_keys=False))
    assert main([str(path)]) == 0
    rows = {r["criterion"]: r for r in json.loads((tmp_path / "tiny-llmp" / "bench.json").read_text())["rows"]}
    recipe = {"name": "tiny-llmp-run", "seed": 3, "model": {"source": "tiny-random-llama"}, "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 4, "seq_len": 32,
                      "sampling": "llm_pruner"},
        "score": {"type": "score", "units": "width", "criteria": ["taylor"], "settings": {"taylor": taylor}},
        "prune": {"type": "prune", "units": "width", **opts},
        "eval": {"type": "evaluate", "perplexity": bench["perplexity"]}}}
    rpath = tmp_path / "run.yaml"
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert run_main([str(rpath), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    plan = json.loads(next((tmp_path / "runs" / "tiny-llmp-run").glob("*prune/plan.json")).read_text())
    metrics = json.loads((tmp_path / "runs" / "tiny-llmp-run" / "metrics.json").read_text())
    kept = {k: [s_[k] for s_ in plan["shapes_after"]] for k in plan["shapes_after"][0]}
    assert rows["official"]["kept_widths"] == kept and kept["num_key_value_heads"] == [2, 1, 1, 1, 1, 2]
    assert rows["official"]["params"] == metrics["model"]["params_after"] == plan["params_after"]
    ppl = metrics["eval"]["pruned"]["tiny"]["ppl"]
    assert abs(rows["official"]["eval"]["tiny"]["ppl"] - ppl) < 1e-4 * ppl  # same units removed (gradients summed per window)
    assert rows["units"]["eval"]["tiny"]["ppl"] != rows["official"]["eval"]["tiny"]["ppl"]  # the settings were applied


def test_a_bench_row_s_settings_are_checked_against_its_criterion(tmp_path):
    from prunelab.bench import load_bench
    from prunelab.recipe import RecipeError

    bench = {"name": "b", "model": {"source": "tiny-random-llama"},
             "calibration": {"source": {"path": "tests/data/tiny_corpus.txt"}},
             "perplexity": {"tiny": {"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 64}},
             "width": [{"criterion": "taylor", "settings": {"grouping": "nope"}}]}
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(bench))
    import pytest

    with pytest.raises(RecipeError, match="grouping"):
        load_bench(str(path))


def test_a_killed_bench_resumes_from_its_finished_rows(tmp_path, monkeypatch):
    """A bench killed mid-way keeps every finished row; ``--resume`` recomputes only the rest (the same numbers),
    a plain re-run refuses to mix with them, and a changed setting gets a new row instead of the stale one."""
    import pytest

    import prunelab.bench as bench_mod
    import prunelab.stages.evaluation.perplexity as ppl_mod

    text = {"path": "tests/data/tiny_corpus.txt"}
    recipe = {
        "name": "tiny-resume", "seed": 0, "output_dir": str(tmp_path), "model": {"source": "tiny-random-llama"},
        "calibration": {"source": text, "num_samples": 3, "seq_len": 32},
        "perplexity": {"tiny": {"source": text, "seq_len": 64, "max_tokens": 512}},
        "criteria": ["block_influence", "random"], "targets": [{"num_blocks": 2}], "cost_ratio": False,
        "width_ratio": 0.15, "width": [{"criterion": "wanda_sp", "label": "w1"}, {"criterion": "flap", "label": "w2"}],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    evaluated: list[str] = []
    inner = ppl_mod.windowed_perplexity
    kill_at = ["ppl w2"]

    def counting(*args, **kwargs):
        if kwargs.get("desc") in kill_at:
            kill_at.clear()
            raise KeyboardInterrupt  # what a kill looks like from inside: this row never finishes
        evaluated.append(kwargs.get("desc", ""))
        return inner(*args, **kwargs)

    monkeypatch.setattr(ppl_mod, "windowed_perplexity", counting)
    with pytest.raises(KeyboardInterrupt):
        main([str(path)])
    out = tmp_path / "tiny-resume"
    assert sorted(p.name.split("-")[0] for p in (out / "rows").glob("[!.]*")) == ["dense", "depth", "depth", "score",
                                                                             "score", "width"]
    assert not (out / "bench.json").exists()
    assert main([str(path)]) == 2  # neither --resume nor --force: refuse before any work

    evaluated.clear()
    assert main([str(path), "--resume"]) == 0
    assert evaluated == ["ppl w2"]  # the dense, depth and first width rows came back from disk
    resumed = json.loads((out / "bench.json").read_text())
    assert len(resumed["resumed"]) == 6
    assert [r["criterion"] for r in resumed["rows"]] == ["dense", "block_influence", "random", "w1", "w2"]
    assert "Resumed (`--resume`): 6 finished entries" in (out / "bench.md").read_text()
    rows_s = sum(r["score_s"] + r["eval"]["eval_s"] for r in resumed["rows"])
    assert f"This resumed run itself: {resumed['total_s']:.0f} s" in (out / "bench.md").read_text()
    assert f"the rows' total s add up to {rows_s:.0f} s" in (out / "bench.md").read_text()
    assert all(r["eval"]["torch_threads"] == resumed["torch_threads"] for r in resumed["rows"])
    other = json.loads((out / "bench.json").read_text())
    other["rows"][1]["eval"]["torch_threads"] = resumed["torch_threads"] + 1  # as if resumed at another count
    md = bench_mod.to_markdown(other, "cmd")
    assert "| block_influence † |" in md and f"earlier process at {resumed['torch_threads'] + 1})" in md
    assert "| dense |" in md

    evaluated.clear()
    assert main([str(path), "--force"]) == 0  # start over: every row again, the same numbers
    fresh = json.loads((out / "bench.json").read_text())
    assert len(evaluated) == 5 and fresh["resumed"] == []
    assert f"Total {fresh['total_s']:.0f} s, overall peak RSS" in (out / "bench.md").read_text()
    assert [r["eval"]["tiny"]["ppl"] for r in fresh["rows"]] == [r["eval"]["tiny"]["ppl"] for r in resumed["rows"]]

    evaluated.clear()
    recipe["width"][1]["compensation"] = "bias"  # one row's settings change: only that row runs again
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main([str(path), "--resume"]) == 0
    assert evaluated == ["ppl w2"]


def test_two_shards_split_a_bench_and_a_resume_assembles_the_same_table(tmp_path, monkeypatch):
    """``--shard 0/2`` and ``--shard 1/2`` each evaluate their half of the rows (shard 0 also the dense row);
    the run without a shard evaluates nothing and writes the table a single run writes."""
    import pytest

    import prunelab.stages.evaluation.perplexity as ppl_mod

    text = {"path": "tests/data/tiny_corpus.txt"}
    recipe = {
        "name": "tiny-shards", "seed": 0, "output_dir": str(tmp_path / "a"), "model": {"source": "tiny-random-llama"},
        "calibration": {"source": text, "num_samples": 3, "seq_len": 32},
        "perplexity": {"tiny": {"source": text, "seq_len": 64, "max_tokens": 512}},
        "criteria": ["block_influence", "random", "ppl"], "targets": [{"num_blocks": 2}],
        "width_ratio": 0.15, "width": [{"criterion": "wanda_sp", "label": "w1"}, {"criterion": "flap", "label": "w2"}],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    evaluated: list[str] = []
    inner = ppl_mod.windowed_perplexity

    def counting(*args, **kwargs):
        evaluated.append(kwargs.get("desc", ""))
        return inner(*args, **kwargs)

    monkeypatch.setattr(ppl_mod, "windowed_perplexity", counting)
    with pytest.raises(SystemExit):
        main([str(path), "--shard", "1/2"])  # a shard without --resume: refused by the argument parser
    with pytest.raises(SystemExit):
        main([str(path), "--shard", "2/2", "--resume"])
    assert main([str(path), "--shard", "1/2", "--resume"]) == 0
    assert evaluated == ["ppl random @ 2 blocks", "ppl w1"]  # rows 1 and 3 of the five pruned rows
    evaluated.clear()
    assert main([str(path), "--shard", "0/2", "--resume"]) == 0
    assert evaluated == ["ppl dense", "ppl block_influence @ 2 blocks", "ppl ppl @ 2 blocks", "ppl w2"]
    assert not (tmp_path / "a" / "tiny-shards" / "bench.json").exists()  # a shard writes rows, not the table
    evaluated.clear()
    assert main([str(path), "--resume"]) == 0
    assert evaluated == []
    sharded = json.loads((tmp_path / "a" / "tiny-shards" / "bench.json").read_text())

    recipe["output_dir"] = str(tmp_path / "b")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main([str(path)]) == 0
    single = json.loads((tmp_path / "b" / "tiny-shards" / "bench.json").read_text())
    assert [r["criterion"] for r in sharded["rows"]] == [r["criterion"] for r in single["rows"]]
    assert [r["eval"]["tiny"]["ppl"] for r in sharded["rows"]] == pytest.approx(
        [r["eval"]["tiny"]["ppl"] for r in single["rows"]], rel=1e-6)
    assert sharded["scores"].keys() == single["scores"].keys() and sharded["ppl_cost_ratio"] is not None
