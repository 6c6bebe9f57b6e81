"""Iterative pruning (the ``iterate`` stage): prune → recover cycles reach the target, each cycle's plan is recorded,
the composed plan is in the original numbering, and a run killed between cycles resumes to the same model — depth
(recipes/debug-iterative.yaml) and width (recipes/debug-iterative-width.yaml: FLAP, optimal compensation). The tiny
random Llama on the CPU; the library tests take seconds, a CLI run about half a minute."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from prunelab.recipe import RecipeError, load_raw, load_recipe, validate

RECIPE = "recipes/debug-iterative.yaml"
WIDTH = "recipes/debug-iterative-width.yaml"
FAST = ["--no-progress", "stages.eval_dense.perplexity.tiny.max_tokens=1024",
        "stages.eval_recovered.perplexity.tiny.max_tokens=1024"]


# ----------------------------------------------------------------------------- the library
def test_blocks_split_evenly_over_cycles():
    from prunelab.stages.iterative.cycles import split_blocks

    assert split_blocks(4, 4) == [1, 1, 1, 1]
    assert split_blocks(5, 2) == [3, 2]
    assert split_blocks(6, 4) == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="fewer than cycles=3"):
        split_blocks(2, 3)


def test_cycle_plans_compose_into_the_original_numbering():
    from prunelab.stages.iterative.cycles import compose_depth
    from prunelab.stages.surgery.plan import DepthPlan, DepthTarget, Merge

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
    from prunelab.stages.recovery.losses import block_pairs

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
    from prunelab.run import main

    assert main([RECIPE, "--output-dir", str(tmp_path), *FAST, "stages.iterate.cycles=3"]) == 2
    assert "stages.iterate: num_blocks=2 cannot be split over cycles=3; lower cycles" in capsys.readouterr().err
    assert not (tmp_path / "debug-iterative" / "04-iterate").exists()


# ----------------------------------------------------------------------------- runs
def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((run / "model").glob("*.safetensors"))))


def _kill_in_cycle_2_then_resume(monkeypatch, trainer, main, argv: list[str]) -> list[str]:
    """Run ``argv`` killed as cycle 2's recovery starts, then ``--resume`` it: cycle 1 must be replayed (not trained
    again) and only cycle 2 trained. Returns the list that keeps recording which recoveries run."""
    real, labels = trainer.recover_model, []

    def crash_in_cycle_2(env, cfg, base, out_dir, label, *args, **kwargs):
        labels.append(label)
        if label == "cycle-02":
            raise RuntimeError("simulated kill")
        return real(env, cfg, base, out_dir, label, *args, **kwargs)

    monkeypatch.setattr(trainer, "recover_model", crash_in_cycle_2)
    # the CLI never lets a traceback out: an internal failure is exit 1, its traceback in the run's run.log
    assert main(argv) == 1
    monkeypatch.setattr(trainer, "recover_model", lambda *a, **k: labels.append(a[4]) or real(*a, **k))
    assert main([*argv, "--resume"]) == 0
    assert labels == ["cycle-01", "cycle-02", "cycle-02"]
    return labels


def test_cycles_reach_the_target_and_a_run_killed_after_cycle_1_resumes_to_the_same_model(tmp_path, monkeypatch):
    from prunelab.run import main
    from prunelab.stages.recovery import trainer

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
    labels = _kill_in_cycle_2_then_resume(monkeypatch, trainer, main, [RECIPE, "--output-dir", str(tmp_path / "b"), *FAST])
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


# ----------------------------------------------------------------------------- width: the library
def test_width_cycle_goals_are_fractions_of_the_dense_model():
    from prunelab.stages.iterative.width import cycle_goal

    assert [cycle_goal(1000, 0.2, c, 4) for c in (1, 2, 3, 4)] == [950, 900, 850, 800]
    assert [cycle_goal(238_592, 0.2, c, 2) for c in (1, 2)] == [214_733, 190_874]  # round(0.1·P₀), round(0.2·P₀)


def _shapes(*widths):
    from prunelab.stages.surgery.plan import LayerShape

    return [LayerShape(num_attention_heads=q, num_key_value_heads=kv, intermediate_size=m) for q, kv, m in widths]


def test_width_cycle_plans_compose_into_the_dense_numbering():
    from prunelab.stages.iterative.width import compose_width
    from prunelab.stages.surgery.plan import LayerRemoval, WidthPlan, WidthTarget

    # 3 layers of 4 query heads in 2 KV groups, 8 MLP channels. Cycle 1: layer 0 loses KV group 1 (query heads 2, 3)
    # and channels 1, 5; layer 1 loses query heads 0 and 2 (one per group) and channel 0; layer 2 nothing.
    one = WidthPlan(criterion="flap", target=WidthTarget(ratio=0.1, allocation="global"), layers={
        "0": LayerRemoval(q_heads=[2, 3], kv_heads=[1], mlp=[1, 5]), "1": LayerRemoval(q_heads=[0, 2], mlp=[0])},
        shapes_before=_shapes((4, 2, 8), (4, 2, 8), (4, 2, 8)), shapes_after=_shapes((2, 1, 6), (2, 2, 7), (4, 2, 8)),
        uniform=False, num_removed=8, layers_before=3, layers_after=3, params_before=1000, params_after=900)
    # Cycle 2, in cycle 1's numbering: layer 0 keeps channels [0, 2, 3, 4, 6, 7] and loses its 1 and 4 (= 2, 6);
    # layer 1 keeps query heads [1, 3] and channels [1..7]: it loses KV group 1 (its query head 1 = 3) and channel 6 (= 7);
    # layer 2 loses channel 0.
    two = WidthPlan(criterion="flap", target=WidthTarget(ratio=0.11, allocation="global"), layers={
        "0": LayerRemoval(mlp=[1, 4]), "1": LayerRemoval(q_heads=[1], kv_heads=[1], mlp=[6]), "2": LayerRemoval(mlp=[0])},
        shapes_before=one.shapes_after, shapes_after=_shapes((2, 1, 4), (1, 1, 6), (4, 2, 7)),
        uniform=False, num_removed=6, layers_before=3, layers_after=3, params_before=900, params_after=800)
    plan = compose_width([one, two], 0.2)
    assert {k: v.model_dump() for k, v in plan.layers.items()} == {
        "0": {"q_heads": [2, 3], "kv_heads": [1], "mlp": [1, 2, 5, 6]},
        "1": {"q_heads": [0, 2, 3], "kv_heads": [1], "mlp": [0, 7]},
        "2": {"q_heads": [], "kv_heads": [], "mlp": [0]},
    }
    assert plan.shapes_before == one.shapes_before and plan.shapes_after == two.shapes_after and not plan.uniform
    assert (plan.num_removed, plan.params_before, plan.params_after, plan.achieved_ratio) == (14, 1000, 800, 0.2)
    assert plan.target.ratio == 0.2 and plan.target.allocation.type == "global" and plan.side_file is None
    assert "14 units removed" in plan.describe() and "20.00% of all parameters" in plan.describe()
    with pytest.raises(ValueError, match="cycle plan 2 was made for layer widths"):
        compose_width([one, one])


def _score(calib):
    from prunelab.stages.criteria.scoring import score_criteria

    def score(model, folder, k, extra):
        results, stats = score_criteria("width", ["flap"], model, calib, extra_needs=extra, progress=False)
        return results["flap"], stats

    return score


def _fake_recovery(method: str, calls: list[str] | None = None, crash: str | None = None):
    """What the trainer leaves, without training: every weight (full) or a LoRA adapter (lora) moved by a fixed,
    cycle-dependent amount, saved where the trainer saves it, then applied as the trainer does."""
    from prunelab.stages.recovery.model import apply_trained, trained_folder

    def recover(model, out_dir, label, plan):
        if calls is not None:
            calls.append(label)
        if label == crash:
            raise RuntimeError("simulated kill")
        gen = torch.Generator().manual_seed(int(label[-2:]))
        folder = out_dir / trained_folder(method)
        folder.mkdir(parents=True)
        if method == "full":
            from safetensors.torch import save_file

            save_file({n: p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()},
                      str(folder / "model.safetensors"))
        else:
            from peft import get_peft_model

            from prunelab.stages.recovery.config import LoraSettings
            from prunelab.stages.recovery.model import lora_config

            peft = get_peft_model(copy.deepcopy(model), lora_config(LoraSettings(rank=4, alpha=8, dropout=0.0), model))
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.data.copy_(0.05 * torch.randn(p.shape, generator=gen))
            peft.save_pretrained(str(folder))
        return {"label": label, "steps": 0, "model": apply_trained(model, folder, method)}

    return recover


def _cycles(folder, prune, cycles=2, method="full", resume=False):
    from prunelab.stages.iterative.cycles import Cycles

    return Cycles(folder, "k", prune, cycles, method, seed=0, resume=resume, log=lambda m: None)


@pytest.mark.parametrize("allocation,attention", [("global", "kv_group"), ("uniform", "q_head")])
def test_width_cycles_reach_the_dense_target_and_the_composed_plan_rebuilds_the_structure(tmp_path, tiny_model, calib,
                                                                                          allocation, attention):
    from prunelab.stages.arch import adapter_for
    from prunelab.stages.io.tiny import tiny_llama
    from prunelab.stages.iterative.cycles import prune_settings, run_cycles
    from prunelab.stages.iterative.width import cycle_goal
    from prunelab.stages.surgery.apply import apply_plan

    prune = prune_settings({"units": "width", "criterion": "flap", "ratio": 0.3, "allocation": allocation,
                            "attention": attention})
    dense = adapter_for(tiny_model).total_params()
    unit = max(max(g.params_per_kv_group(), 2 * g.params_per_mlp_channel()) for g in adapter_for(tiny_model).geometries())
    state = _cycles(tmp_path, prune, cycles=3)
    # no recovery: the composed plan applied to the dense model must give exactly the model the cycles made
    model, plan = run_cycles(state, tiny_model, _score(calib), lambda m, *a: {"steps": 0, "model": m})
    cycles = [json.loads((tmp_path / f"cycle-{c:02d}" / "plan.json").read_text()) for c in (1, 2, 3)]
    for c, p in enumerate(cycles, start=1):  # each cycle ends near its share of the dense target (whole units)
        goal = cycle_goal(dense, 0.3, c, 3)
        assert abs(p["params_after"] - goal) <= (unit if allocation == "global" else 6 * unit), (c, p["params_after"], goal)
        assert p["params_before"] == (dense if c == 1 else cycles[c - 2]["params_after"])
        assert p["target"]["ratio"] == pytest.approx((p["params_before"] - goal) / p["params_before"])
    assert plan.params_before == dense and plan.params_after == adapter_for(model).total_params() == cycles[-1]["params_after"]
    assert plan.target.ratio == 0.3 and plan.num_removed == sum(p["num_removed"] for p in cycles) and plan.describe()
    rebuilt = apply_plan(tiny_llama(num_layers=6, heads=4, kv_heads=2, tie=True), plan)
    mine, theirs = dict(model.named_parameters()), dict(rebuilt.named_parameters())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_width_cycles_with_compensation_replay_exactly_after_a_kill(tmp_path, calib, method):
    """Optimal compensation changes the kept o_proj/down_proj columns and adds biases: replay applies the cycle's
    saved compensation, then merges the adapter onto it (lora) or loads the trained weights (full)."""
    from prunelab.stages.io.tiny import tiny_llama
    from prunelab.stages.iterative.cycles import prune_settings, run_cycles

    prune = prune_settings({"units": "width", "criterion": "flap", "ratio": 0.2, "allocation": "global",
                            "compensation": {"type": "optimal", "damping": 0.01, "bias": True}})
    dense = lambda: tiny_llama(num_layers=6, heads=4, kv_heads=2, tie=True)
    ids = calib[:1]
    a, plan_a = run_cycles(_cycles(tmp_path / "a", prune, method=method), dense(), _score(calib), _fake_recovery(method))
    assert (tmp_path / "a" / "cycle-01" / "compensation.safetensors").is_file()
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_cycles(_cycles(tmp_path / "b", prune, method=method), dense(), _score(calib), _fake_recovery(method, calls, "cycle-02"))
    b, plan_b = run_cycles(_cycles(tmp_path / "b", prune, method=method, resume=True), dense(), _score(calib),
                           _fake_recovery(method, calls))
    assert calls == ["cycle-01", "cycle-02", "cycle-02"] and plan_b == plan_a
    replayed, plan_r = run_cycles(_cycles(tmp_path / "a", prune, method=method, resume=True), dense(), None, None)
    assert plan_r == plan_a
    with torch.no_grad():
        want = a(ids).logits
        for other in (b, replayed):
            assert (other(ids).logits - want).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- width: settings and the CLI
def test_width_recipe_validates_and_names_its_mistakes():
    cfg = load_recipe(WIDTH).stages["iterate"]
    assert cfg.prune.units == "width" and cfg.prune.ratio == 0.2 and cfg.prune.compensation.type == "optimal"
    assert load_recipe(RECIPE).stages["iterate"].prune.units == "blocks"
    for override, needle in [
        ("stages.iterate.prune.layer_ratio=0.1", "stages.iterate.prune: give exactly one width target"),
        ("stages.iterate.prune.units=hidden", "stages.iterate.prune: units 'hidden': choose blocks | width"),
        ("stages.iterate.prune.num_blocks=2", "stages.iterate.prune.num_blocks: num_blocks is a depth target"),
        ("stages.iterate.prune.allocation=nope", "stages.iterate.prune.allocation: allocation 'nope'"),
        ("stages.iterate.prune.criterion=block_influence", "unknown width criterion 'block_influence'"),
        ("stages.iterate.settings={laco: {threshold: 0.5}}", "stages.iterate.settings.laco: unknown width criterion"),
    ]:
        with pytest.raises(RecipeError) as err:
            load_recipe(WIDTH, [override])
        assert needle in str(err.value), (override, str(err.value))
    with pytest.raises(RecipeError, match="layer_ratio: iterate's width target is `ratio`"):
        load_recipe(WIDTH, ["stages.iterate.prune.ratio=null", "stages.iterate.prune.layer_ratio=0.1",
                            "stages.iterate.prune.allocation=uniform"])
    from prunelab.stages.selection.config import WidthSettings

    if "experts" in WidthSettings.model_fields:  # mixture-of-experts units do not compose across cycles yet
        with pytest.raises(RecipeError, match="experts: iterate composes heads, KV groups and MLP channels"):
            load_recipe(WIDTH, ["stages.iterate.prune.experts={ratio: 0.25, criterion: reap}",
                                "stages.iterate.prune.compensation=none"])
    raw = load_raw(WIDTH)
    del raw["stages"]["calibrate"]
    raw["stages"]["iterate"]["prune"].update(criterion="magnitude", compensation="none")  # data-free, but width observes inputs
    with pytest.raises(RecipeError, match="criterion 'magnitude' needs calibration data"):
        validate(raw)


def _logits(folder: Path) -> torch.Tensor:
    from prunelab.stages.io.loader import load_pruned

    model = load_pruned(folder)
    with torch.no_grad():
        return model(torch.arange(3, 40).unsqueeze(0)).logits


def test_width_cycles_run_from_the_cli_and_a_run_killed_after_cycle_1_resumes_to_the_same_logits(tmp_path, monkeypatch):
    from prunelab.run import main
    from prunelab.stages.recovery import trainer
    from prunelab.stages.iterative.width import cycle_goal

    fast = ["--no-progress", "stages.eval_dense.perplexity.tiny.max_tokens=1024",
            "stages.eval_recovered.perplexity.tiny.max_tokens=1024"]
    assert main([WIDTH, "--output-dir", str(tmp_path / "a"), *fast]) == 0
    run = tmp_path / "a" / "debug-iterative-width"
    stage, metrics = run / "04-iterate", json.loads((run / "metrics.json").read_text())
    cycles = [json.loads((stage / f"cycle-{c:02d}" / "plan.json").read_text()) for c in (1, 2)]
    assert all(p["kind"] == "width" and p["side_file"] == "compensation.safetensors" for p in cycles)
    assert all((stage / f"cycle-{c:02d}" / "compensation.safetensors").is_file() for c in (1, 2))
    dense = cycles[0]["params_before"]
    assert cycles[1]["params_before"] == cycles[0]["params_after"]
    composed = json.loads((stage / "plan.json").read_text())
    assert composed["kind"] == "width" and composed["target"]["ratio"] == 0.2 and composed["side_file"] is None
    # whole units: within two MLP channels (3 × 64 weights each; the bias entries compensation adds are not in the cost)
    assert abs(composed["params_after"] - cycle_goal(dense, 0.2, 2, 2)) <= 2 * 3 * 64
    assert composed["shapes_after"] == cycles[1]["shapes_after"] and composed["num_removed"] == sum(p["num_removed"] for p in cycles)
    assert metrics["plan"]["kind"] == "width" and metrics["plan"]["removed_units"] == composed["num_removed"]
    assert metrics["model"]["params_after"] == composed["params_after"]
    assert [c["label"] for c in metrics["recover"]["pruned"]["cycles"]] == ["cycle-01", "cycle-02"]
    # the export reloads, with the composed widths and the run's logits (checked by the export stage too)
    config = json.loads((run / "model" / "config.json").read_text())
    assert [s["intermediate_size"] for s in config["prunelab_layer_shapes"]] == [s["intermediate_size"] for s in composed["shapes_after"]]
    assert "Width pruning by `flap`" in (run / "model" / "README.md").read_text()

    # Killed as cycle 2's recovery starts; resumed: cycle 1 is replayed (compensation + adapter), cycle 2 runs.
    _kill_in_cycle_2_then_resume(monkeypatch, trainer, main, [WIDTH, "--output-dir", str(tmp_path / "b"), *fast])
    resumed = tmp_path / "b" / "debug-iterative-width"
    assert json.loads((resumed / "04-iterate" / "plan.json").read_text()) == composed
    assert (_logits(run / "model") - _logits(resumed / "model")).abs().max().item() <= 1e-5
    assert json.loads((resumed / "metrics.json").read_text())["eval"] == metrics["eval"]
