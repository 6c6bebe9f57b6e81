"""Iterative pruning (the ``iterate`` stage): prune → recover cycles reach the target, each cycle's plan is recorded,
the composed plan is in the original numbering, and a run killed between cycles resumes to the same model.
The tiny random Llama on the CPU (recipes/debug-iterative.yaml); about a minute a run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pipeline.recipe import RecipeError, load_raw, load_recipe, validate

RECIPE = "recipes/debug-iterative.yaml"
FAST = ["--no-progress", "stages.eval_dense.perplexity.tiny.max_tokens=1024",
        "stages.eval_recovered.perplexity.tiny.max_tokens=1024"]


# ----------------------------------------------------------------------------- the library
def test_blocks_split_evenly_over_cycles():
    from stages.recovery.iterative import split_blocks

    assert split_blocks(4, 4) == [1, 1, 1, 1]
    assert split_blocks(5, 2) == [3, 2]
    assert split_blocks(6, 4) == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="fewer than cycles=3"):
        split_blocks(2, 3)


def test_cycle_plans_compose_into_the_original_numbering():
    from stages.recovery.iterative import compose_depth
    from stages.surgery.plan import DepthPlan, DepthTarget, Merge

    # 8 blocks: cycle 1 removes 2 and 5; of the 6 left [0,1,3,4,6,7] cycle 2 removes 4 (= 6) and merges 3 (= 4) into 2 (= 3)
    one = DepthPlan(criterion="bi", removed_blocks=[2, 5], num_removed=2, layers_before=8, layers_after=6,
                    params_before=800, params_after=600)
    two = DepthPlan(criterion="bi", removed_blocks=[3, 4], merges=[Merge(into=2, from_=[3])], num_removed=2,
                    layers_before=6, layers_after=4, params_before=600, params_after=400)
    plan = compose_depth([one, two], DepthTarget(num_blocks=4))
    assert plan.removed_blocks == [2, 4, 5, 6] and plan.layers_before == 8 and plan.layers_after == 4
    assert [(m.into, m.from_) for m in plan.merges] == [(3, [4])]
    assert (plan.params_before, plan.params_after, plan.achieved_ratio) == (800, 400, 0.5)
    # the intermediate loss pairs the final student's blocks with the dense teacher's kept ones [0, 1, 3, 7]
    from stages.recovery.losses import block_pairs

    assert block_pairs(plan, 8, 4) == [(1, 1), (2, 2), (3, 4), (4, 8)]
    with pytest.raises(ValueError, match="made for 8 blocks follows a model of 6"):
        compose_depth([one, one], DepthTarget(num_blocks=4))


# ----------------------------------------------------------------------------- settings
def test_recipe_validates_and_names_its_mistakes():
    cfg = load_recipe(RECIPE).stages["iterate"]
    assert cfg.cycles == 2 and cfg.prune.num_blocks == 2 and cfg.recover.loss.type == "kd"
    assert cfg.recover.data.teacher_generate.num_samples == 8
    for override, needle in [
        ("stages.iterate.cycles=0", "stages.iterate.cycles"),
        ("stages.iterate.prune.criterion=nope", "unknown blocks criterion 'nope'"),
        ("stages.iterate.prune.ratio=0.2", "give exactly one target"),
        ("stages.iterate.recover.loop.batch_size=7", "not a multiple of micro_batch_size"),
        ("stages.iterate.settings={laco: {threshold: 0.5}}", "this stage scores 'block_influence' only"),
    ]:
        with pytest.raises(RecipeError) as err:
            load_recipe(RECIPE, [override])
        assert needle in str(err.value), (override, str(err.value))
    raw = load_raw(RECIPE)
    with_prune = copy.deepcopy(raw)
    stages = with_prune["stages"]
    with_prune["stages"] = {"calibrate": stages["calibrate"], "score": {"type": "score", "criteria": ["block_influence"]},
                            "prune": {"type": "prune", "criterion": "block_influence", "num_blocks": 1},
                            "iterate": stages["iterate"]}
    with pytest.raises(RecipeError, match="iterate prunes and recovers by itself"):
        validate(with_prune)
    no_calibration = copy.deepcopy(raw)
    del no_calibration["stages"]["calibrate"]
    with pytest.raises(RecipeError, match="needs calibration data"):
        validate(no_calibration)
    # a final, longer recovery after the cycles is allowed
    final = copy.deepcopy(raw)
    final["stages"]["heal"] = {"type": "recover", "data": raw["stages"]["iterate"]["recover"]["data"] | {"teacher_generate": None}}
    validate(final)


def test_a_target_that_cannot_be_split_is_refused_before_work(tmp_path, capsys):
    from pipeline.run import main

    assert main([RECIPE, "--output-dir", str(tmp_path), *FAST, "stages.iterate.cycles=3"]) == 2
    assert "stages.iterate: num_blocks=2 cannot be split over cycles=3; lower cycles" in capsys.readouterr().err
    assert not (tmp_path / "debug-iterative" / "04-iterate").exists()


# ----------------------------------------------------------------------------- runs
def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((run / "model").glob("*.safetensors"))))


def test_cycles_reach_the_target_and_a_run_killed_after_cycle_1_resumes_to_the_same_model(tmp_path, monkeypatch):
    from pipeline.run import main
    from stages.recovery import trainer

    # Uninterrupted.
    assert main([RECIPE, "--output-dir", str(tmp_path / "a"), *FAST]) == 0
    run = tmp_path / "a" / "debug-iterative"
    stage = run / "04-iterate"
    metrics = json.loads((run / "metrics.json").read_text())
    cycles = [json.loads((stage / f"cycle-{c:02d}" / "plan.json").read_text()) for c in (1, 2)]
    assert [(p["layers_before"], p["num_removed"]) for p in cycles] == [(6, 1), (5, 1)]
    composed = json.loads((stage / "plan.json").read_text())
    first = cycles[0]["removed_blocks"][0]
    kept = [b for b in range(6) if b != first]
    assert composed["removed_blocks"] == sorted([first, kept[cycles[1]["removed_blocks"][0]]])
    assert metrics["plan"]["removed_blocks"] == composed["removed_blocks"]
    assert metrics["model"]["layers_after"] == 4 and json.loads((run / "model" / "config.json").read_text())["num_hidden_layers"] == 4
    rec = metrics["recover"]["pruned"]
    assert rec["steps"] == 6 and [c["label"] for c in rec["cycles"]] == ["cycle-01", "cycle-02"]
    assert len(list((stage / "teacher-generated").glob("shard-*.pt"))) == 2  # generated once, for every cycle
    assert json.loads((stage / "cycle-01" / "recover" / "samples.json").read_text())["dataset_size"] == 32 + 8

    # Killed as cycle 2's recovery starts; resumed: cycle 1 is replayed (not trained again), cycle 2 runs.
    real, labels = trainer.recover_model, []

    def crash_in_cycle_2(env, cfg, base, out_dir, label, *args, **kwargs):
        labels.append(label)
        if label == "cycle-02":
            raise RuntimeError("simulated kill")
        return real(env, cfg, base, out_dir, label, *args, **kwargs)

    monkeypatch.setattr(trainer, "recover_model", crash_in_cycle_2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main([RECIPE, "--output-dir", str(tmp_path / "b"), *FAST])
    monkeypatch.setattr(trainer, "recover_model", lambda *a, **k: labels.append(a[4]) or real(*a, **k))
    assert main([RECIPE, "--output-dir", str(tmp_path / "b"), *FAST, "--resume"]) == 0
    assert labels == ["cycle-01", "cycle-02", "cycle-02"]
    resumed = tmp_path / "b" / "debug-iterative"
    assert json.loads((resumed / "04-iterate" / "plan.json").read_text())["removed_blocks"] == composed["removed_blocks"]
    a, b = _weights(run), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "metrics.json").read_text())["eval"] == metrics["eval"]

    # A finished run resumes by replaying its cycles: nothing trains, the same numbers.
    labels.clear()
    stamp = json.loads((stage / "done.json").read_text())["finished"]
    assert main([RECIPE, "--output-dir", str(tmp_path / "a"), *FAST, "--resume"]) == 0
    assert labels == [] and json.loads((stage / "done.json").read_text())["finished"] == stamp
    assert json.loads((run / "metrics.json").read_text())["eval"] == metrics["eval"]
