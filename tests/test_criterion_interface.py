"""One criterion interface for depth and width: one registry and spec class, one scoring path and result shape,
settings that belong to their criterion (validated against its model), the version-1 keys, and ``partial/``
resume for width scoring as for depth."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prunelab.recipe import RecipeError, validate
from prunelab.stages.criteria import CRITERIA, HIDDEN_CRITERIA
from prunelab.stages.criteria.registry import CriterionRegistry, CriterionSpec, criteria_for, register_criterion
from prunelab.stages.score import ScoreConfig

ROOT = Path(__file__).resolve().parents[1]
V1_RUNS = ROOT / "tests" / "fixtures" / "v1-runs"


# ----------------------------------------------------------------------------- one registry, one spec, one path
def test_depth_and_width_criteria_live_in_one_registry_with_one_spec_class():
    specs = list(CRITERIA)
    assert {s.kind for s in specs} == {"depth", "width"}
    assert all(type(s) is CriterionSpec for s in specs)
    # separate name spaces: the same word is a different criterion per kind
    assert CRITERIA.get("depth", "magnitude").score_fn != CRITERIA.get("width", "magnitude").score_fn
    assert criteria_for("blocks") is CRITERIA.of("depth") and criteria_for("hidden") is CRITERIA.of("width")
    assert set(HIDDEN_CRITERIA) == {s.name for s in specs if s.hidden is not None} and "flap" not in HIDDEN_CRITERIA
    assert CRITERIA.get("depth", "laco").settings is not None and CRITERIA.get("width", "taylor").settings is not None


def test_registration_rejects_a_duplicate_within_a_kind_only():
    reg = CriterionRegistry()
    register_criterion("x", "m:f", "depth", registry=reg)
    register_criterion("x", "m:f", "width", registry=reg)
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("x", "m:g", "depth", registry=reg)
    with pytest.raises(ValueError, match="only width criteria"):
        register_criterion("y", "m:f", "depth", hidden="m:h", registry=reg)
    with pytest.raises(KeyError, match="unknown width criterion 'z'"):
        reg.get("width", "z")


def test_registry_and_settings_stay_torch_free():
    code = ("import sys, prunelab.stages.criteria, prunelab.stages.score; from prunelab.stages.criteria.registry import CRITERIA; "
            "[s.settings for s in CRITERIA]; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_every_criterion_through_the_one_scoring_path(tiny_model, calib):
    """Depth and width: same inputs class, same call, same typed result, the JSON layout selection reads."""
    from prunelab.stages.calibration.full import collect_stats
    from prunelab.stages.criteria.base import CriterionInputs, CriterionResult
    from prunelab.stages.criteria.scoring import needs_for, score
    from prunelab.stages.criteria.settings import LacoSettings
    from prunelab.stages.prune import prune_config

    for kind in ("depth", "width"):
        names = CRITERIA.of(kind).names()
        stats = collect_stats(tiny_model, calib, needs_for(kind, names, {"hidden"} if kind == "width" else ()),
                              batch_size=3, progress=False)
        for name in names:
            spec = CRITERIA.get(kind, name)
            settings = LacoSettings(merge_layers=2, threshold=-1.0) if name == "laco" else None
            prune = prune_config({"type": "prune", "units": "sublayers", "criterion": name, "num_sublayers": 2}) \
                if name == "sublayer_sleb" else None  # it removes sublayers until a later prune stage's target
            inputs = CriterionInputs(tiny_model, stats, 0, settings, calib, 3, 2 if spec.iterative else None, False,
                                     prune=prune)
            result = score(spec, inputs, hidden=True)
            assert isinstance(result, CriterionResult) and result.kind == kind
            saved = result.to_json()
            assert saved["paper"] == spec.paper and saved["seconds"] >= 0
            if kind == "depth":
                assert len(saved["scores"]) == 6 and "protected" in saved
            else:
                assert saved["units"] == "width" and len(saved["layers"]) == 6
                assert ("hidden" in saved) == (spec.hidden is not None)


def test_a_result_needs_its_kinds_scores():
    from prunelab.stages.criteria.base import CriterionResult

    with pytest.raises(ValueError, match="width criterion result needs `layers`"):
        CriterionResult(kind="width")
    assert CriterionResult(scores=[float("inf"), 1.0], protected=[0]).to_json() == {"scores": [None, 1.0], "protected": [0]}


# ----------------------------------------------------------------------------- settings belong to their criterion
BASE = {
    "name": "s", "model": {"source": "tiny-random-llama"},
    "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 2, "seq_len": 16},
        "score": {"type": "score", "criteria": ["laco", "ppl"]},
        "prune": {"type": "prune", "criterion": "laco", "num_blocks": 2},
    },
}


def _recipe(**score):
    raw = copy.deepcopy(BASE)
    raw["stages"]["score"].update(score)
    if score.get("units") == "width":
        raw["stages"]["prune"] = {"type": "prune", "units": "width", "criterion": score["criteria"][0], "layer_ratio": 0.25}
    return raw


@pytest.mark.parametrize("score,expected", [
    ({"settings": {"laco": {"merge_layer": 2}}},
     "stages.score.settings.laco.merge_layer: unknown key; did you mean 'merge_layers'?"),
    ({"settings": {"laco": {"threshold": 2}}}, "stages.score.settings.laco.threshold: Input should be less than 1"),
    ({"settings": {"ppl": {"x": 1}}}, "stages.score.settings.ppl: depth criterion 'ppl' has no settings"),
    ({"settings": {"lacoo": {}}}, "stages.score.settings.lacoo: unknown depth criterion 'lacoo'"),
    ({"units": "width", "criteria": ["taylor"], "settings": {"taylor": {"reduction": "median"}}},
     "stages.score.settings.taylor.reduction: Input should be 'sum', 'mean', 'max' or 'prod'"),
    ({"units": "width", "criteria": ["magnitude"], "settings": {"magnitude": {"reduction": "mean"}}},
     "width criterion 'magnitude' has no settings"),
    ({"units": "width", "criteria": ["flap"], "settings": {"laco": {}}}, "settings.laco: unknown width criterion"),
    ({"criteria": ["ppl"], "settings": {"laco": {"threshold": 0.3}}}, "settings.laco: this stage does not score 'laco'"),
    ({"units": "width", "criteria": ["flap"], "reduction": "mean"},
     "`reduction: mean` moved into the settings of each criterion that reduces over group members"),
    ({"units": "width", "criteria": ["flap"], "laco": {"threshold": 0.3}}, "remove it from this width score stage"),
])
def test_criterion_settings_are_checked_against_their_model(score, expected):
    with pytest.raises(RecipeError) as err:
        validate(_recipe(**score))
    assert expected in str(err.value), str(err.value)


def test_settings_reach_the_criterion_as_its_model():
    from prunelab.stages.criteria.settings import LacoSettings, WidthGroupSettings

    recipe = validate(_recipe(settings={"laco": {"merge_layers": 2, "layers": [1, 4]}}))
    laco = recipe.stages["score"].settings["laco"]
    assert laco == LacoSettings(merge_layers=2, layers=(1, 4))
    width = validate(_recipe(units="width", criteria=["taylor_vector"], settings={"taylor_vector": {"reduction": "max"}}))
    assert width.stages["score"].settings == {"taylor_vector": WidthGroupSettings(reduction="max")}
    dumped = width.stages["score"].model_dump(mode="json")
    assert dumped["settings"] == {"taylor_vector": {"reduction": "max"}} and "reduction" not in dumped


# ----------------------------------------------------------------------------- version 1 keys and hashes
def test_version_1_keys_migrate_to_the_criterion_settings():
    old = ScoreConfig.model_validate({"type": "score", "criteria": ["laco"], "laco": {"threshold": 0.3}})
    assert old.settings["laco"].threshold == 0.3 and old == ScoreConfig.model_validate(
        {"type": "score", "criteria": ["laco"], "settings": {"laco": {"threshold": 0.3}}})
    width = ScoreConfig.model_validate({"type": "score", "units": "width", "criteria": ["taylor", "flap", "magnitude_l1"],
                                        "reduction": "mean"})
    assert {n: s.reduction for n, s in width.settings.items()} == {"taylor": "mean", "magnitude_l1": "mean"}
    defaults = {"type": "score", "criteria": ["ppl"], "reduction": "sum",
                "laco": {"merge_layers": 4, "layers": None, "interval": 1, "threshold": 0.45}}
    assert ScoreConfig.model_validate(defaults).settings == {}  # a version-1 dump restates the defaults only
    with pytest.raises(ValueError, match="given twice"):
        ScoreConfig.model_validate({"type": "score", "criteria": ["laco"], "laco": {"threshold": 0.3},
                                    "settings": {"laco": {"threshold": 0.2}}})


@pytest.mark.parametrize("name", ["debug", "debug-width", "debug-recover"])
def test_v1_settings_reproduce_the_version_1_dump_of_each_fixture(name):
    resolved = yaml.safe_load((V1_RUNS / name / "recipe.resolved.yaml").read_text())
    old = next(s for s in resolved["stages"].values() if s["type"] == "score")
    assert ScoreConfig.model_validate(old).v1_settings() == old


def test_v1_settings_of_new_spellings():
    laco = {"merge_layers": 2, "layers": [2, 27], "interval": 1, "threshold": 0.4}
    cfg = ScoreConfig.model_validate({"type": "score", "criteria": ["laco"], "batch_size": 4, "settings": {"laco": laco}})
    assert cfg.v1_settings() == {"type": "score", "units": "blocks", "criteria": ["laco"], "batch_size": 4, "laco": laco,
                                 "reduction": "sum"}
    mean = ScoreConfig.model_validate({"type": "score", "units": "width", "criteria": ["taylor", "flap"],
                                       "settings": {"taylor": {"reduction": "mean"}}})
    assert mean.v1_settings()["reduction"] == "mean"
    mixed = ScoreConfig.model_validate({"type": "score", "units": "width", "criteria": ["taylor", "taylor_vector"],
                                        "settings": {"taylor": {"reduction": "mean"}}})
    assert mixed.v1_settings()["reduction"] not in ("sum", "mean", "max", "prod")  # version 1 could not say it


# ----------------------------------------------------------------------------- partial/ resume, width as depth
def test_partial_results_are_trusted_only_under_the_same_inputs(tmp_path):
    from prunelab.stages.criteria.scoring import PartialResults

    first = PartialResults(tmp_path / "partial", "k1")
    first.save("flap", {"units": "width", "layers": []})
    assert first.load(["flap", "taylor"]) == {"flap": {"units": "width", "layers": []}}
    assert PartialResults(tmp_path / "partial", "k2").load(["flap"]) == {}  # other settings: stale, removed
    assert not (tmp_path / "partial").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "flap.json").write_text("{}")  # written by a version without inputs.json
    assert PartialResults(tmp_path / "old", "k1").load(["flap"]) == {}


def _width_recipe(tmp_path: Path) -> Path:
    recipe = {
        "name": "wp", "model": {"source": "tiny-random-llama"},
        "stages": {
            "calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 4, "seq_len": 32},
            "score": {"type": "score", "units": "width", "criteria": ["flap", "taylor", "magnitude"],
                      "settings": {"taylor": {"reduction": "mean"}}},
            "prune": {"type": "prune", "units": "width", "criterion": "taylor", "layer_ratio": 0.25},
        },
    }
    path = tmp_path / "wp.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _without_seconds(scores: dict) -> dict:
    return {n: {k: v for k, v in r.items() if k != "seconds"} for n, r in scores.items()}


def test_width_scoring_crashed_after_one_criterion_resumes_without_recomputing_it(tmp_path, monkeypatch):
    """A crash in the second criterion; --resume re-uses the first from partial/ and ends with the numbers of an
    uninterrupted run (scores, plan, activation summaries)."""
    import torch

    from prunelab.run import main
    from prunelab.stages.criteria import width

    path = _width_recipe(tmp_path)
    assert main([str(path), "--output-dir", str(tmp_path / "ref"), "--no-progress"]) == 0

    def crash(inp):
        raise RuntimeError("killed while scoring taylor")

    monkeypatch.setattr(width, "taylor", crash)
    # the CLI turns the failure into exit 1 and one paragraph; the traceback goes to run.log
    assert main([str(path), "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 1
    assert "killed while scoring" in (tmp_path / "run" / "wp" / "run.log").read_text()
    score_dir = next((tmp_path / "run" / "wp").glob("*-score"))
    assert sorted(p.name for p in (score_dir / "partial").glob("*.json")) == ["flap.json", "inputs.json"]
    assert not (score_dir / "done.json").exists()
    monkeypatch.undo()

    calls = []
    original = width.flap
    monkeypatch.setattr(width, "flap", lambda inp: calls.append(1) or original(inp))
    assert main([str(path), "--output-dir", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    assert calls == [], "the finished criterion was computed again"
    ref_dir = next((tmp_path / "ref" / "wp").glob("*-score"))
    ref, got = (json.loads((d / "scores.json").read_text()) for d in (ref_dir, score_dir))
    assert _without_seconds(got) == _without_seconds(ref)
    plans = [json.loads(next((tmp_path / r / "wp").glob("*-prune/plan.json")).read_text()) for r in ("ref", "run")]
    assert plans[0]["layers"] == plans[1]["layers"]
    a, b = (torch.load(d / "activation_means.pt") for d in (ref_dir, score_dir))
    assert all(torch.equal(x, y) for x, y in zip(a["o_proj"] + a["down_proj"], b["o_proj"] + b["down_proj"]))
