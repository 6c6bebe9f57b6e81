"""``python -m prunelab.benchmarks.propagate_compare`` on the tiny Llama: a finished width run, its windows and plan
reused, every variant's plan equal, the table and JSON written (the SmolLM2 numbers live in docs/calibration.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from prunelab.benchmarks.propagate_compare import CompareError, compare, main, parse_variant, table, variant_recipe

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "tests/data/tiny_corpus.txt")
EVAL = {"tiny": {"source": {"path": CORPUS}, "seq_len": 64, "max_tokens": 512}}


def _reference(tmp_path: Path) -> Path:
    """A finished full-pipeline run: FLAP global 20% + optimal compensation, dense and pruned perplexity."""
    from prunelab.run import main as run_main

    raw = {"name": "tiny-ref", "seed": 0, "model": {"source": "tiny-random-llama"}, "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": CORPUS}, "num_samples": 4, "seq_len": 64},
        "eval_dense": {"type": "evaluate", "perplexity": EVAL},
        "score": {"type": "score", "units": "width", "criteria": ["flap"]},
        "prune": {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.2, "allocation": "global",
                  "compensation": "optimal"},
        "eval_pruned": {"type": "evaluate", "perplexity": EVAL}}}
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert run_main([str(path), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    return tmp_path / "runs" / "tiny-ref"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _reference(tmp_path_factory.mktemp("ref"))


def test_the_report_compares_every_variant_on_the_reference_plan(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--from-run", str(reference), "--work", str(tmp_path / "work"), "--variants", "dense", "pruned",
                 "pruned-self@0.1", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "propagate_compare.json").read_text())
    metrics = json.loads((reference / "metrics.json").read_text())
    dense = metrics["eval"]["dense"]["tiny"]["ppl"]
    assert report["dense"] == {"tiny": dense} and report["plans_identical"] is True
    assert list(report["variants"]) == ["dense", "pruned", "pruned-self@0.1"]
    for v in report["variants"].values():
        assert v["plan_equals_reference"] is True
        assert v["ratio_to_dense"]["tiny"] == pytest.approx(v["ppl"]["tiny"] / dense)
    # propagate: dense is pipeline: full's compensation (the sequential statistics equal full's up to float rounding)
    assert report["variants"]["dense"]["side_max_abs_diff_to_reference"] < 1e-5
    assert report["variants"]["dense"]["ppl"]["tiny"] == pytest.approx(metrics["eval"]["pruned"]["tiny"]["ppl"],
                                                                       rel=1e-5)
    # the pruned-path fits differ from it, and from each other
    diffs = [report["variants"][k]["side_max_abs_diff_to_reference"] for k in ("pruned", "pruned-self@0.1")]
    assert all(d > 1e-3 for d in diffs)
    assert report["variants"]["pruned-self@0.1"]["compensation"]["damping"] == 0.1
    assert report["variants"]["pruned-self@0.1"]["pipeline"]["target"] == "self"
    md = (out / "propagate_compare.md").read_text()
    assert table(report) in md and "propagate: pruned, target: self" in md and "Protocol:" in md
    assert md.count("\n| ") == 2 + 1 + 3  # header + dense model + reference + one row per variant


def test_windows_that_differ_from_the_reference_are_refused(reference: Path, tmp_path: Path) -> None:
    """The comparison is on the reference run's windows: rebuilt windows that differ stop it before the score pass."""
    import shutil

    copy = tmp_path / "ref"
    shutil.copytree(reference, copy)
    windows = torch.load(copy / "02-calibrate" / "calibration.pt", weights_only=True)
    torch.save(windows.flip(0), copy / "02-calibrate" / "calibration.pt")
    with pytest.raises(CompareError, match="calibration windows differ"):
        compare(copy, tmp_path / "work", ["dense"], progress=False)


def test_bad_variants_and_runs_are_refused_by_name() -> None:
    with pytest.raises(CompareError, match="unknown variant 'pruned-x'"):
        parse_variant("pruned-x")
    with pytest.raises(CompareError, match="must be a number"):
        parse_variant("pruned@a")
    assert parse_variant("pruned-self@0.1") == ("pruned-self", {"type": "sequential", "propagate": "pruned",
                                                                "target": "self"}, 0.1)
    raw = {"name": "r", "stages": {"calibrate": {"type": "calibrate"}, "score": {"type": "score"},
                                   "prune": {"type": "prune", "units": "blocks"}, "e": {"type": "evaluate"}}}
    with pytest.raises(CompareError, match="stages.prune.units"):
        variant_recipe(raw, "pruned", Path("/tmp"), False)
    raw["stages"]["prune"] = {"type": "prune", "units": "width", "compensation": {"type": "bias"}}
    with pytest.raises(CompareError, match="damping applies to compensation: optimal only"):
        variant_recipe(raw, "pruned@0.1", Path("/tmp"), False)
    got = variant_recipe(raw, "pruned-self", Path("/tmp/w"), False)
    assert got["stages"]["calibrate"]["pipeline"] == {"type": "sequential", "propagate": "pruned", "target": "self"}
    assert list(got["stages"]) == ["calibrate", "score", "prune", "e"] and got["output_dir"] == "/tmp/w"
