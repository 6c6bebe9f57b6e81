"""`engines:` and `round_to:` of a width prune (issue 25 items 2, 3): the plan honours what the named engines run
(vLLM: one query-head count in every layer; llama.cpp/vLLM: uniform widths outside Llama-layout families), kept MLP
widths are multiples of round_to, the default settings plan exactly as before, and bad settings are refused by name."""

from __future__ import annotations

import copy
import json
import math
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


@pytest.mark.parametrize("engine,family", [("llama.cpp", "qwen3"), ("vllm", "qwen2")])
def test_non_llama_family_refuses_per_layer_widths_at_plan_time(engine, family):
    """deci (llama.cpp) loads Qwen2's q/k/v biases but not Qwen3's per-head q/k norms; vLLM's DeciLM neither."""
    model = tiny_family(family)
    with pytest.raises(WidthTargetError, match=rf"engines: {engine} — allocation: global gives the '{family}' layers"):
        _plan(model, ratio=0.2, allocation="global", engines=[engine])
    plan = _plan(model, ratio=0.2, engines=[engine])  # uniform runs under the family's own architecture
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
    ("tiny-random-qwen3", {"allocation": "global", "engines": ["llama.cpp"]},
     "stages.prune.engines: llama.cpp — allocation: global gives the 'qwen3' layers different widths"),
    ("tiny-random-gemma2", {"layers": [1, 3], "engines": ["vllm"]}, "use allocation: uniform without `layers`"),
    ("tiny-random-llama", {"layers": [1, 5], "engines": ["vllm"]},
     "engines: vllm — attention: kv_group with layers: [1, 5] removes query heads in those layers only"),
], ids=["llama.cpp qwen3 global", "vllm gemma2 layers", "vllm llama layers"])
def test_engine_refusals_at_dry_run(source, prune, expected):
    from prunelab.preflight import preflight

    with pytest.raises(RecipeError) as exc:
        preflight(validate(_recipe(source, **prune)))
    assert expected in str(exc.value)


@pytest.mark.parametrize("source,prune", [
    ("tiny-random-llama", {"allocation": "global", "engines": ["vllm", "llama.cpp"]}),  # constrained, not refused
    ("tiny-random-llama", {"layers": [1, 5], "attention": "none", "engines": ["vllm"]}),
    ("tiny-random-qwen2", {"engines": ["llama.cpp", "vllm"]}),
    ("tiny-random-qwen2", {"allocation": "global", "engines": ["llama.cpp"]}),  # deci, q/k/v biases included
], ids=["llama global", "vllm mlp-only layers", "qwen2 uniform", "llama.cpp qwen2 global"])
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


def _two_low_groups(model) -> list[dict[str, list[float]]]:
    """Scores where FLAP's global plan removes one KV group in 2 of 6 layers (score −5; mean 0.33 per layer, which
    rounds to 0) and every other layer's lowest group scores 0.5, above the MLP channels the plan removes — the
    SmolLM2 case of docs/round-to.md: the rounded mean gives back the cheapest groups for dearer MLP channels."""
    rng = random.Random(1)
    out = []
    for i, g in enumerate(adapter_for(model).geometries()):
        out.append({"q_heads": [rng.random() for _ in range(g.n_q)],
                    "kv_groups": [-5.0 if i in (0, 1) else 0.5] + [2.0] * (g.n_kv - 1),
                    "mlp": [rng.uniform(-1.0, 1.0) for _ in range(g.intermediate)]})
    return out


def _constrained_plans(model, scores, counts, monkeypatch, **settings):
    """The vLLM plan with the uniform count forced to each of ``counts``."""
    import prunelab.stages.selection.engines as engines

    cfg = WidthSettings(criterion="flap", engines=["vllm"], **settings)
    real, plans = engines.uniform_counts, {}
    for k in counts:
        monkeypatch.setattr(engines, "uniform_counts", lambda *a, k=k: [k])
        plans[k] = make_width_plan({"layers": scores}, cfg, model, None)[0]
    monkeypatch.setattr(engines, "uniform_counts", real)
    return plans


def _score_times_params(model, plan, scores) -> float:
    """Σ score × params of the removed KV groups and MLP channels, per removed parameter (written out here, apart
    from engines.removed_importance)."""
    geos, total = adapter_for(model).geometries(), 0.0
    for i, rem in plan.layers.items():
        g, sc = geos[int(i)], scores[int(i)]
        total += sum(sc["kv_groups"][kv] for kv in rem.kv_heads) * g.hidden * g.head_dim * (2 * g.q_per_group + 2)
        total += sum(sc["mlp"][c] for c in rem.mlp) * 3 * g.hidden
    return total / _removed(model, plan)


def test_vllm_uniform_count_is_the_best_score_estimate_not_the_rounded_mean(wide, monkeypatch):
    """engines: [vllm] with FLAP global: the uniform KV count is the one whose plan removes the least score ×
    parameters at the same target (the objective the global ranking minimizes), not the rounded mean of the free
    plan's counts — here 0.33 rounds to 0, but removing one group everywhere keeps the two −5 groups removed and
    gives back fewer MLP channels. Fails with the rounded mean (the rule before issue 25 item 4's fix)."""
    scores = _two_low_groups(wide)
    cfg = WidthSettings(criterion="flap", ratio=0.2, allocation="global")
    free = make_width_plan({"layers": scores}, cfg, wide, None)[0]
    assert sorted(4 - s.num_key_value_heads for s in free.shapes_after) == [0, 0, 0, 0, 1, 1]  # mean 1/3 → rounds to 0
    vllm = make_width_plan({"layers": scores}, WidthSettings(criterion="flap", ratio=0.2, allocation="global",
                                                             engines=["vllm"]), wide, None)[0]
    assert {s.num_key_value_heads for s in vllm.shapes_after} == {3}  # one group removed in every layer
    plans = _constrained_plans(wide, scores, range(4), monkeypatch, ratio=0.2, allocation="global")
    est = {k: _score_times_params(wide, p, scores) for k, p in plans.items()}
    assert min(est, key=est.get) == 1 and est[1] < est[0]
    assert vllm.layers == plans[1].layers
    target = ratio_to_params(0.2, adapter_for(wide).total_params())
    assert abs(_removed(wide, vllm) - target) <= 3 * 64  # the MLP re-selection still meets the target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vllm_uniform_count_minimizes_the_estimate_among_the_tried_counts(wide, monkeypatch, seed):
    """On random scores the kept count is the argmin of score × params per removed parameter over the counts tried
    (floor − 1 … ceiling + 1 of the free plan's mean), computed here independently."""
    import prunelab.stages.selection.engines as engines

    scores = _scores(wide, seed)
    free = make_width_plan({"layers": scores}, WidthSettings(criterion="flap", ratio=0.25, allocation="global"), wide, None)[0]
    chosen = {i: {"q_heads": [], "kv_heads": [], "mlp": []} for i in range(6)}
    chosen.update({int(i): r.model_dump() for i, r in free.layers.items()})
    counts = engines.uniform_counts(chosen, adapter_for(wide).geometries(), list(range(6)), "kv_group")
    mean = sum(len(r["kv_heads"]) for r in chosen.values()) / 6
    assert counts == [k for k in range(4) if math.floor(mean) - 1 <= k <= math.ceil(mean) + 1 and k <= 3]
    plans = _constrained_plans(wide, scores, counts, monkeypatch, ratio=0.25, allocation="global")
    est = {k: _score_times_params(wide, p, scores) for k, p in plans.items()}
    best = min(est, key=lambda k: (est[k], k))
    vllm = make_width_plan({"layers": scores}, WidthSettings(criterion="flap", ratio=0.25, allocation="global",
                                                             engines=["vllm"]), wide, None)[0]
    assert vllm.layers == plans[best].layers
