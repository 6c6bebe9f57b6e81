"""The benchmark script on a tiny model: every row present, JSON + Markdown written, README updated."""

from __future__ import annotations

import json

import yaml

from pipeline.bench import main


def test_bench_depth_and_width_rows(tmp_path):
    recipe = {
        "name": "tiny-bench", "seed": 0, "output_dir": str(tmp_path), "model": {"source": "tiny-random-llama"},
        "calibration": {"source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 3, "seq_len": 32},
        "perplexity": {"tiny": {"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 64, "max_tokens": 512}},
        "criteria": ["block_influence", "ppl", "sleb", "random"],
        "targets": [{"num_blocks": 2}, {"ratio": 0.2}],
        "width_ratio": 0.15,
        "width": [{"criterion": "flap", "allocation": "global", "compensation": "bias"}, {"criterion": "taylor"}],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- bench:tiny-bench:start -->\nold\n<!-- bench:tiny-bench:end -->\nafter\n")
    assert main([str(path), "--update-readme", str(readme)]) == 0
    report = json.loads((tmp_path / "tiny-bench" / "bench.json").read_text())
    assert len(report["rows"]) == 1 + 4 * 2 + 2
    assert report["rows"][0]["criterion"] == "dense"
    assert report["ppl_cost_ratio"]["max_rel_diff"] < 1e-5
    assert all(r["eval"]["tiny"]["seq_len"] == 64 for r in report["rows"])
    sleb6 = next(r for r in report["rows"] if r["criterion"] == "sleb" and r["target"] == "2 blocks")
    assert len(sleb6["removed_blocks"]) == 2
    text = readme.read_text()
    assert "old" not in text and "| tiny-bench" not in text and "flap" in text and text.endswith("after\n")
