"""Benchmarks as rows of recipes run through the runner (prunelab.benchmarks), on a tiny model: the rows of the
in-process bench of before re-assembled, the table and README written, resume and shards through the runner."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from prunelab.benchmarks.cli import main
from prunelab.benchmarks.spec import BenchError, load_bench

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bench-v1"
TIMINGS = {"score_s", "plan_s", "score_peak_rss_mb", "peak_rss_mb", "eval_s", "torch_threads", "seconds", "speed"}
TEXT = {"path": "tests/data/tiny_corpus.txt"}


def _untimed(x):
    """A bench.json part without what a clock or the process decides."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def _float32_floor() -> float:
    """|PPL32 − PPL64| / PPL64 of the fixture's dense model (tiny-random-llama) on the fixture's perplexity protocol
    (first 512 tokens of tests/data/tiny_corpus.txt in windows of 64), on this machine."""
    import copy

    import torch

    from prunelab.stages.evaluation.perplexity import windowed_perplexity
    from prunelab.stages.io.config import ModelConfig, TextSource
    from prunelab.stages.io.models import load_model
    from prunelab.stages.io.text import tokenized_source

    model, tokenizer = load_model(ModelConfig(source="tiny-random-llama"))
    ids = tokenized_source(tokenizer, TextSource(path="tests/data/tiny_corpus.txt"))
    p32 = windowed_perplexity(model.float(), ids, 64, 512, progress=False)["ppl"]
    p64 = windowed_perplexity(copy.deepcopy(model).double(), ids, 64, 512, progress=False)["ppl"]
    assert math.isfinite(p32) and torch.get_default_dtype() == torch.float32
    return abs(p32 - p64) / p64


def _ppls(rows):
    return [(r["criterion"], n, v["ppl"]) for r in rows for n, v in r["eval"].items() if isinstance(v, dict) and "ppl" in v]


def test_the_rows_of_the_in_process_bench_are_re_assembled(tmp_path):
    """tests/fixtures/bench-v1: a bench.json the old in-process bench (pipeline/bench.py, run_bench) wrote. Every row
    re-run as its own recipe through the runner gives the same rows: the same blocks removed, widths kept,
    parameter counts and protocols, and perplexities equal to 1e-9 relative (0 on the machine that wrote the fixture:
    the same stages compute the same numbers). The bound is this machine's float32 floor, measured: 10× the relative
    gap between the dense tiny model's float32 and float64 perplexity on the same protocol — another CPU's GEMM
    kernels (or thread count) sum in another order, which moves float32 perplexities by ~1e-8 relative, while a
    changed computation moves them by orders more."""
    old = json.loads((FIXTURES / "tiny-bench.json").read_text())
    rel = max(10 * _float32_floor(), 1e-9)
    assert main([str(FIXTURES / "tiny-bench.yaml"), "--output-dir", str(tmp_path)]) == 0
    new = json.loads((tmp_path / "tiny-bench" / "bench.json").read_text())
    strip = lambda rows: [{**r, "eval": {k: {f: x for f, x in v.items() if f != "ppl"} if isinstance(v, dict) else v
                                        for k, v in r["eval"].items()}} for r in _untimed(rows)]  # noqa: E731
    assert strip(new["rows"]) == strip(old["rows"])
    for (c, n, a), (c2, n2, b) in zip(_ppls(new["rows"]), _ppls(old["rows"]), strict=True):
        assert (c, n) == (c2, n2) and abs(a - b) <= rel * b, (c, n, a, b, rel)
    assert _untimed(new["scores"]).keys() == _untimed(old["scores"]).keys()
    assert {k: old[k] for k in ("name", "model", "seed", "calibration")} == {k: new[k] for k in ("name", "model", "seed", "calibration")}
    # each row is a run directory of the runner's own
    runs = sorted(p.name for p in (tmp_path / "tiny-bench" / "rows").iterdir() if p.is_dir())
    assert "dense" in runs and "ppl--2-blocks" in runs and all((tmp_path / "tiny-bench" / "rows" / r / "metrics.json").is_file() for r in runs)


def _grid(tmp_path, name, **over):
    spec = {"name": name, "seed": 0, "output_dir": str(tmp_path), "model": {"source": "tiny-random-llama"},
            "calibration": {"source": TEXT, "num_samples": 3, "seq_len": 32},
            "perplexity": {"tiny": {"source": TEXT, "seq_len": 64, "max_tokens": 512}}, **over}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, spec


def test_table_json_and_readme(tmp_path):
    path, _ = _grid(tmp_path, "tiny-bench", criteria=["block_influence", "laco"], laco={"merge_layers": 2, "threshold": -1.0},
                    targets=[{"num_blocks": 2}, {"ratio": 0.2}], width_ratio=0.15,
                    width=[{"criterion": "flap", "allocation": "alpha", "compensation": "bias"},
                           {"criterion": "taylor", "units": "hidden", "label": "taylor-hidden"}])
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench:tiny-bench:start -->\nold\n<!-- bench:tiny-bench:end -->\nafter\n")
    assert main([str(path), "--update-readme", str(readme)]) == 0
    report = json.loads((tmp_path / "tiny-bench" / "bench.json").read_text())
    assert [r["criterion"] for r in report["rows"]][:3] == ["dense", "block_influence", "laco"]
    assert len(report["rows"]) == 1 + 2 * 2 + 2
    laco = [r for r in report["rows"] if r["criterion"] == "laco"]
    assert len(laco[0]["removed_blocks"]) == 2 and laco[1]["layers"] == 6 - len(laco[1]["removed_blocks"])
    alpha = next(r for r in report["rows"] if r["criterion"].startswith("flap (alpha"))
    hidden = next(r for r in report["rows"] if r["criterion"] == "taylor-hidden")
    assert alpha["uniform"] is False and hidden["uniform"] and abs(hidden["achieved_ratio"] - 0.15) < 0.04
    assert report["ppl_cost_ratio"]["max_rel_diff"] < 1e-5
    text = readme.read_text()
    assert "old" not in text and "flap" in text and text.endswith("after\n")


def test_two_windows_arc_and_decode_speed(tmp_path):
    arc = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc" / "arc_easy_test.jsonl"
    path, _ = _grid(tmp_path, "tiny-bench2", perplexity={"ppl128": {"source": TEXT, "seq_len": 128, "max_tokens": 1024},
                                                         "ppl512": {"source": TEXT, "seq_len": 512, "max_tokens": 1024}},
                    tasks={"arc_easy": {"path": str(arc), "limit": 4, "batch_size": 4}},
                    speed={"prompt_len": 8, "new_tokens": 3, "batch_sizes": [1, 2], "repeats": 1},
                    criteria=["block_influence"], targets=[{"num_blocks": 2}], cost_ratio=False)
    assert main([str(path)]) == 0
    report = json.loads((tmp_path / "tiny-bench2" / "bench.json").read_text())
    row = report["rows"][1]
    assert row["eval"]["ppl128"]["seq_len"] == 128 and row["eval"]["ppl512"]["seq_len"] == 512
    assert row["eval"]["arc_easy"]["samples"] == 4 and "acc_norm" in row["eval"]["arc_easy"]
    assert set(row["eval"]["speed"]["decode_tok_s"]) == {"1", "2"}
    md = (tmp_path / "tiny-bench2" / "bench.md").read_text()
    assert "ppl128 PPL (seq 128; × dense)" in md and "arc_easy acc_norm" in md and "decode speedup (bs 1/2)" in md
    assert next(line for line in md.splitlines() if "| dense |" in line).count("(1.00×)") == 2
    assert any(c.endswith("sha256 ok") for c in report["checksums_verified"])


def test_a_bad_row_is_refused_before_anything_runs_naming_row_and_field(tmp_path):
    path, spec = _grid(tmp_path, "b", width=[{"criterion": "taylor", "settings": {"grouping": "nope"}}])
    with pytest.raises(BenchError, match="grouping"):
        load_bench(path)
    native = {"name": "n", "base": "recipes/debug.yaml", "rows": {"ok": {"stages.prune.num_blocks": 1},
                                                                   "bad": {"stages.prune.num_blocks": -3}}}
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(native, sort_keys=False))
    with pytest.raises(BenchError, match=r"rows\[1\] 'bad': .*num_blocks"):
        load_bench(tmp_path / "n.yaml")
    assert main([str(tmp_path / "n.yaml"), "--output-dir", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # refused before a folder was made


def test_the_native_form_a_base_recipe_with_rows_of_overrides_and_a_shared_evaluation(tmp_path):
    """``base`` + ``evaluate`` + ``rows`` of dotted overrides: each row is the base recipe with its overrides and the
    shared evaluation in place of the base's evaluate / export stages, run through the runner."""
    spec = {"name": "native", "base": "recipes/debug.yaml",
            "evaluate": {"perplexity": {"tiny": {"source": TEXT, "seq_len": 64, "max_tokens": 512}}},
            "rows": {"dense": {"dense": True}, "bi-1": {"stages.prune.num_blocks": 1, "stages.prune.criterion": "block_influence",
                                                        "stages.score.criteria": ["block_influence"]},
                     "bi-2": {"stages.prune.criterion": "block_influence", "stages.score.criteria": ["block_influence"]}}}
    path = tmp_path / "native.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    bench = load_bench(path, str(tmp_path))
    assert [list(r.stages) for r in bench.recipes()] == [["eval"], ["calibrate", "score", "prune", "eval"],
                                                         ["calibrate", "score", "prune", "eval"]]
    assert main([str(path), "--output-dir", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "native" / "bench.json").read_text())
    assert [r["row"] for r in got["rows"]] == ["dense", "bi-1", "bi-2"] and got["rows"][0]["ratio"] == {"tiny": 1.0}
    assert got["rows"][1]["params"] > got["rows"][2]["params"]  # one block removed, then two
    metrics = json.loads((tmp_path / "native" / "rows" / "bi-2" / "metrics.json").read_text())
    assert got["rows"][2]["ppl"]["tiny"] == metrics["eval"]["pruned"]["tiny"]["ppl"]


def test_a_killed_bench_resumes_through_the_runner(tmp_path, monkeypatch):
    """A bench killed inside a row keeps every finished row; a plain re-run refuses, ``--resume`` reads the finished
    rows back and the runner continues the killed one from its finished stages; a changed row alone runs again."""
    import prunelab.runner as runner_mod
    import prunelab.stages.evaluation.perplexity as ppl_mod

    path, spec = _grid(tmp_path, "tiny-resume", criteria=["block_influence", "random"], targets=[{"num_blocks": 2}],
                       cost_ratio=False, width_ratio=0.15,
                       width=[{"criterion": "wanda_sp", "label": "w1"}, {"criterion": "flap", "label": "w2"}])
    ran: list[str] = []
    kill = ["width01--flap"]
    execute, inner = runner_mod.execute, ppl_mod.windowed_perplexity

    def recording(recipe, *args, **kwargs):
        ran.append(recipe.name)
        return execute(recipe, *args, **kwargs)

    def killing(*args, **kwargs):
        if ran and ran[-1] in kill:
            kill.clear()
            raise KeyboardInterrupt  # what a kill looks like from inside: this row never finishes
        return inner(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "execute", recording)
    monkeypatch.setattr(ppl_mod, "windowed_perplexity", killing)
    with pytest.raises(KeyboardInterrupt):
        main([str(path)])
    out = tmp_path / "tiny-resume"
    assert not (out / "bench.json").exists() and (out / "rows" / "width01--flap" / "metrics.json").is_file()
    assert main([str(path)]) == 2  # neither --resume nor --force: refuse before any work
    ran.clear()
    assert main([str(path), "--resume"]) == 0
    assert ran == ["width01--flap"]  # the others came back finished
    log = (out / "rows" / "width01--flap" / "run.log").read_text()
    assert "03-score: restored from a finished run" in log  # the runner's own resume
    resumed = json.loads((out / "bench.json").read_text())
    assert resumed["resumed"] == ["dense", "block_influence--2-blocks", "random--2-blocks", "width00--wanda_sp"]
    assert "Resumed (`--resume`): 4 finished rows" in (out / "bench.md").read_text()

    ran.clear()
    spec["width"][1]["compensation"] = "bias"  # one row's settings change: only that row runs again
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main([str(path), "--resume"]) == 0
    assert ran == ["width01--flap"]
    ran.clear()
    assert main([str(path), "--force"]) == 0  # start over: every row again, the same numbers
    fresh = json.loads((out / "bench.json").read_text())
    assert len(ran) == 5 and fresh["resumed"] == []
    assert _ppls(fresh["rows"])[:4] == _ppls(resumed["rows"])[:4]


def test_two_shards_split_a_bench_and_a_resume_assembles_the_same_table(tmp_path, monkeypatch):
    import prunelab.runner as runner_mod

    path, spec = _grid(tmp_path, "tiny-shards", output_dir=str(tmp_path / "a"), criteria=["block_influence", "random"],
                       targets=[{"num_blocks": 2}], cost_ratio=False, width_ratio=0.15,
                       width=[{"criterion": "wanda_sp", "label": "w1"}, {"criterion": "flap", "label": "w2"}])
    ran: list[str] = []
    execute = runner_mod.execute
    monkeypatch.setattr(runner_mod, "execute", lambda recipe, *a, **k: (ran.append(recipe.name), execute(recipe, *a, **k))[1])
    with pytest.raises(SystemExit):
        main([str(path), "--shard", "1/2"])  # a shard without --resume: refused by the argument parser
    with pytest.raises(SystemExit):
        main([str(path), "--shard", "2/2", "--resume"])
    assert main([str(path), "--shard", "1/2", "--resume"]) == 0
    assert ran == ["block_influence--2-blocks", "width00--wanda_sp"]
    ran.clear()
    assert main([str(path), "--shard", "0/2", "--resume"]) == 0
    assert ran == ["dense", "random--2-blocks", "width01--flap"]
    assert not (tmp_path / "a" / "tiny-shards" / "bench.json").exists()  # a shard writes rows, not the table
    ran.clear()
    assert main([str(path), "--resume"]) == 0 and ran == []
    sharded = json.loads((tmp_path / "a" / "tiny-shards" / "bench.json").read_text())
    assert main([str(path), "--output-dir", str(tmp_path / "b")]) == 0
    single = json.loads((tmp_path / "b" / "tiny-shards" / "bench.json").read_text())
    assert _untimed(sharded["rows"]) == _untimed(single["rows"])


def test_every_shipped_bench_spec_compiles_into_valid_recipes():
    """Every spec under recipes/bench validates row by row (the shared data they name must be present)."""
    root = Path(__file__).resolve().parents[1]
    if not (root.parent / "shared" / "data" / "wikitext2" / "valid.txt").is_file():
        pytest.skip("the shared data is not on this machine")
    for spec in sorted((root / "recipes" / "bench").glob("*.yaml")):
        bench = load_bench(spec.relative_to(root)) if Path.cwd() == root else load_bench(spec)
        assert bench.rows and len(bench.recipes()) == len(bench.rows), spec.name
