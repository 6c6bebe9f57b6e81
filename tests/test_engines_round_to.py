"""`engines:` and `round_to:` of a width prune (issue 25 items 2, 3): the plan honours what the named engines run
(vLLM: one query-head count in every layer; llama.cpp/vLLM: uniform widths outside Llama-layout families), kept MLP
widths are multiples of round_to, the default settings plan exactly as before, and bad settings are refused by name."""

from __future__ import annotations

import copy
import json
import random

import pytest

from prunelab.recipe import RecipeError, validate
from prunelab.stages.arch import adapter_for
from prunelab.stages.io.tiny import tiny_family, tiny_llama
from prunelab.stages.selection.config import WidthSettings
from prunelab.stages.selection.planning import make_width_plan
from prunelab.stages.selection.targets import ratio_to_params
from prunelab.stages.selection.width import WidthTargetError, removed_params


def _scores(model, seed: int = 0) -> list[dict[str, list[float]]]:
    """Random unit scores whose KV groups score lower in the later layers, so a global ranking removes more groups
    there (what vLLM cannot hold)."""
    rng = random.Random(seed)
    out = []
    for i, g in enumerate(adapter_for(model).geometries()):
        out.append({"q_heads": [rng.random() for _ in range(g.n_q)],
                     "kv_groups": [rng.random() * (2.0 - 0.3 * i) for _ in range(g.n_kv)],
                     "mlp": [rng.random() * (1 + 0.2 * i) for _ in range(g.intermediate)]})
    return out


@pytest.fixture
def wide():
    """Six layers, 8 query heads in 4 KV groups, 128 MLP channels: room for per-layer differences."""
    return tiny_llama(num_layers=6, hidden=64, heads=8, kv_heads=4, intermediate=128)


def _plan(model, **settings):
    cfg = WidthSettings(criterion="flap", **settings)
    plan, _ = make_width_plan({"layers": _scores(model)}, cfg, model, None)
    return plan


def _removed(model, plan) -> int:
    return removed_params({int(i): r.model_dump() for i, r in plan.layers.items()}, adapter_for(model).geometries())


# ----------------------------------------------------------------------------- vLLM: one query-head count
def test_vllm_global_keeps_query_heads_uniform_and_mlp_per_layer(wide):
    free = _plan(wide, ratio=0.2, allocation="global")
    assert len({s.num_attention_heads for s in free.shapes_after}) > 1  # the constraint has something to do
    plan = _plan(wide, ratio=0.2, allocation="global", engines=["vllm"])
    heads = {s.num_attention_heads for s in plan.shapes_after}
    assert len(heads) == 1 and heads != {8}  # attention still pruned, alike in every layer
    assert all(s.num_attention_heads % s.num_key_value_heads == 0 for s in plan.shapes_after)
    assert len({s.intermediate_size for s in plan.shapes_after}) > 1  # MLP widths still global
    target = ratio_to_params(0.2, adapter_for(wide).total_params())
    mlp_channel = 3 * 64
    assert abs(_removed(wide, plan) - target) <= mlp_channel  # the MLP re-selection meets the target to one channel


def test_vllm_alpha_q_heads_uniform(wide):
    free = _plan(wide, ratio=0.25, allocation={"type": "alpha", "epsilon": 0.2}, attention="q_head")
    plan = _plan(wide, ratio=0.25, allocation={"type": "alpha", "epsilon": 0.2}, attention="q_head", engines=["vllm"])
    assert len({s.num_attention_heads for s in plan.shapes_after}) == 1
    assert len({s.num_attention_heads for s in free.shapes_after}) > 1


def test_vllm_uniform_allocation_is_unchanged(wide):
    plain = _plan(wide, ratio=0.2)
    assert _plan(wide, ratio=0.2, engines=["vllm"]).layers == plain.layers


def test_default_and_llama_cpp_on_llama_plan_as_before(wide):
    """transformers (the default) and llama.cpp on a Llama-layout family constrain nothing: the same plan as a
    recipe without `engines`, per-layer heads included."""
    plain = _plan(wide, ratio=0.2, allocation="global")
    for engines in (["transformers"], ["transformers", "llama.cpp"]):
        assert _plan(wide, ratio=0.2, allocation="global", engines=engines).layers == plain.layers
    assert WidthSettings(criterion="flap", ratio=0.2).model_dump(mode="json") == {
        "units": "width", "criterion": "flap", "ratio": 0.2, "layer_ratio": None, "allocation": {"type": "uniform"},
        "layers": None, "attention": "kv_group", "mlp": True, "compensation": {"type": "none"}}  # hashes as before


@pytest.mark.parametrize("engine", ["llama.cpp", "vllm"])
def test_non_llama_family_refuses_per_layer_widths_at_plan_time(engine):
    model = tiny_family("qwen2")
    with pytest.raises(WidthTargetError, match=rf"engines: {engine} — allocation: global gives the 'qwen2' layers"):
        _plan(model, ratio=0.2, allocation="global", engines=[engine])
    plan = _plan(model, ratio=0.2, engines=[engine])  # uniform runs under qwen2's own architecture
    assert plan.uniform


# ----------------------------------------------------------------------------- refused at --dry-run
BASE = {
    "name": "e", "model": {"source": "tiny-random-llama"},
    "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 2, "seq_len": 16},
        "score": {"type": "score", "units": "width", "criteria": ["flap"]},
        "prune": {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.2},
    },
}


def _recipe(source: str = "tiny-random-llama", **prune):
    raw = copy.deepcopy(BASE)
    raw["model"]["source"] = source
    raw["stages"]["prune"].update(prune)
    return raw


@pytest.mark.parametrize("source,prune,expected", [
    ("tiny-random-qwen2", {"allocation": "global", "engines": ["llama.cpp"]},
     "stages.prune.engines: llama.cpp — allocation: global gives the 'qwen2' layers different widths"),
    ("tiny-random-gemma2", {"layers": [1, 3], "engines": ["vllm"]}, "use allocation: uniform without `layers`"),
    ("tiny-random-llama", {"layers": [1, 5], "engines": ["vllm"]},
     "engines: vllm — attention: kv_group with layers: [1, 5] removes query heads in those layers only"),
], ids=["llama.cpp qwen2 global", "vllm gemma2 layers", "vllm llama layers"])
def test_engine_refusals_at_dry_run(source, prune, expected):
    from prunelab.preflight import preflight

    with pytest.raises(RecipeError) as exc:
        preflight(validate(_recipe(source, **prune)))
    assert expected in str(exc.value)


@pytest.mark.parametrize("source,prune", [
    ("tiny-random-llama", {"allocation": "global", "engines": ["vllm", "llama.cpp"]}),  # constrained, not refused
    ("tiny-random-llama", {"layers": [1, 5], "attention": "none", "engines": ["vllm"]}),
    ("tiny-random-qwen2", {"engines": ["llama.cpp", "vllm"]}),
], ids=["llama global", "vllm mlp-only layers", "qwen2 uniform"])
def test_engine_settings_that_run_pass_dry_run(source, prune):
    from prunelab.preflight import preflight

    preflight(validate(_recipe(source, **prune)))


@pytest.mark.parametrize("prune,expected", [
    ({"round_to": 0}, "greater than or equal to 1"),
    ({"round_to": 8, "mlp": False}, "round_to=8 rounds kept MLP widths, but mlp: false"),
    ({"engines": ["tensorrt"]}, "'transformers', 'llama.cpp' or 'vllm'"),
    ({"engines": ["vllm", "vllm"]}, "names an engine twice"),
    ({"engines": []}, "at least 1 item"),
    ({"units": "blocks", "round_to": 8}, "round_to is a width setting; set units: width"),
], ids=["round_to 0", "round_to without mlp", "unknown engine", "twice", "empty", "blocks"])
def test_bad_settings(prune, expected):
    raw = _recipe(**prune)
    if prune.get("units") == "blocks":
        raw["stages"]["score"]["units"] = "blocks"
    with pytest.raises(RecipeError) as exc:
        validate(raw)
    assert expected in str(exc.value)


def test_round_to_wider_than_a_layer_is_refused_before_calibration(wide):
    cfg = WidthSettings(criterion="flap", ratio=0.2, round_to=256)
    geos = adapter_for(wide).geometries()
    assert cfg.check_model(6, None, None, geos) == ["round_to=256 exceeds layer 0's MLP width (128 channels); choose at most 128"]
    assert WidthSettings(criterion="flap", ratio=0.2, round_to=128).check_model(6, None, None, geos) == []


# ----------------------------------------------------------------------------- round_to
@pytest.mark.parametrize("allocation", ["uniform", "global", {"type": "alpha", "epsilon": 0.2}])
@pytest.mark.parametrize("n", [16, 32])
def test_round_to_kept_mlp_widths_are_multiples(wide, allocation, n):
    plan = _plan(wide, ratio=0.2, allocation=allocation, round_to=n)
    widths = [s.intermediate_size for s in plan.shapes_after]
    assert all(w % n == 0 for w in widths) and min(widths) < 128
    target = ratio_to_params(0.2, adapter_for(wide).total_params())
    step = 3 * 64 * n  # one step of n MLP channels: in one layer (global), or in every layer at once (per-layer ratios)
    miss = abs(_removed(wide, _plan(wide, ratio=0.2, allocation=allocation)) - target)
    assert abs(_removed(wide, plan) - target) <= (step if allocation == "global" else miss + 6 * step / 2)
    scores = _scores(wide)
    for i, rem in plan.layers.items():  # the highest-scoring channels are the kept ones
        kept = set(range(128)) - set(rem.mlp)
        if rem.mlp:
            assert max(scores[int(i)]["mlp"][c] for c in rem.mlp) <= min(scores[int(i)]["mlp"][c] for c in kept)


def test_round_to_one_is_the_plan_of_today(wide):
    for allocation in ("uniform", "global"):
        assert _plan(wide, ratio=0.2, allocation=allocation, round_to=1).layers == _plan(wide, ratio=0.2, allocation=allocation).layers


def test_round_to_with_layer_ratio_is_nearest_multiple(wide):
    plan = _plan(wide, layer_ratio=0.3, round_to=32)  # keeps 0.7 × 128 = 89.6 → 96 (nearest multiple of 32)
    assert {s.intermediate_size for s in plan.shapes_after} == {96}


def test_vllm_with_round_to_end_to_end(tmp_path):
    """The whole pipeline on the tiny model: FLAP global, vLLM and round_to 32 — plan.json has one query-head count
    and kept MLP widths in multiples of 32."""
    import yaml

    from prunelab.run import main

    raw = _recipe(allocation="global", engines=["vllm"], round_to=32)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main([str(path), "--output-dir", str(tmp_path), "--no-progress"]) == 0
    plan = json.loads(next((tmp_path / "e").glob("*-prune/plan.json")).read_text())
    assert len({s["num_attention_heads"] for s in plan["shapes_after"]}) == 1
    assert all(s["intermediate_size"] % 32 == 0 for s in plan["shapes_after"])


def test_vllm_global_keeps_the_uniform_count_with_the_lower_calibration_loss(wide, monkeypatch):
    """With calibration windows (the prune stage), the floor and the ceiling of the global plan's mean KV groups per
    layer are both built, and the plan whose pruned model has the lower calibration loss is kept."""
    import copy

    import torch

    import prunelab.stages.selection.engines as engines
    from prunelab.stages.surgery.apply import apply_plan

    calib = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = WidthSettings(criterion="flap", ratio=0.15, allocation="global", engines=["vllm"])
    free = _plan(wide, ratio=0.15, allocation="global")  # removes 4 KV groups over 6 layers: mean 0.67
    chosen_free = {i: {"q_heads": [], "kv_heads": [], "mlp": []} for i in range(6)}
    chosen_free.update({int(i): r.model_dump() for i, r in free.layers.items()})
    counts = engines.uniform_counts(chosen_free, adapter_for(wide).geometries(), list(range(6)), "kv_group")
    assert len(counts) == 2  # a mean between two counts: there is a choice to make
    plans, losses = {}, {}
    real = engines.uniform_counts
    for k in counts:
        monkeypatch.setattr(engines, "uniform_counts", lambda *a, k=k: [k])
        plans[k] = make_width_plan({"layers": _scores(wide)}, cfg, wide, None, calibration=calib)[0]
        with torch.no_grad():
            pruned = apply_plan(copy.deepcopy(wide), plans[k])
            losses[k] = sum(pruned(w[None], labels=w[None]).loss.item() for w in calib) / len(calib)
    monkeypatch.setattr(engines, "uniform_counts", real)
    chosen = make_width_plan({"layers": _scores(wide)}, cfg, wide, None, calibration=calib)[0]
    assert chosen.layers == plans[min(losses, key=losses.get)].layers
    assert plans[counts[0]].layers != plans[counts[1]].layers
