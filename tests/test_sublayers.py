"""Sublayer removal (He et al., arXiv 2406.15786): no-op surgery equals masking, the KV cache still works, the export
reloads, the criterion equals a hand computation, the plan re-applies, and bad settings are refused by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.io.tiny import tiny_family, tiny_llama

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2")


def _mask(model: torch.nn.Module, attention: list[int], mlp: list[int]) -> None:
    """Zero the output projection (and its bias) of each named sublayer: its residual contribution becomes 0."""
    ad = adapter_for(model)
    with torch.no_grad():
        for role, layers in (("o", attention), ("down", mlp)):
            for i in layers:
                lin = ad.linear(ad.layers[i], role)
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()


def _remove(model: torch.nn.Module, attention: list[int], mlp: list[int]) -> None:
    from prunelab.stages.surgery.sublayers import remove_sublayers

    remove_sublayers(model, attention, mlp)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_equals_masked(family: str) -> None:
    """Exact in float64: a removed sublayer adds 0.0 to the residual stream, a masked one adds 0·x + 0 = 0.0 (and
    OLMo 2's post-norm of a zero vector is 0.0), so both streams are the same numbers (attention of layer 0 included,
    where the cache's sequence length is read)."""
    model = tiny_family(family, num_layers=4).double()
    masked = copy.deepcopy(model)
    attention, mlp = [0, 2], [1, 2]
    _remove(model, attention, mlp)
    _mask(masked, attention, mlp)
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, rtol=0, atol=0)
    geos = adapter_for(model).geometries()
    assert [(g.n_q, g.n_kv) for g in geos][0] == (0, 0) and geos[1].intermediate == 0 and geos[1].n_q > 0


def test_parameter_count() -> None:
    model = tiny_llama(num_layers=4)
    ad = adapter_for(model)
    before = ad.total_params()
    layer = ad.layers[1]
    attn = sum(p.numel() for p in ad.attention(layer).parameters()) + layer.input_layernorm.weight.numel()
    mlp = sum(p.numel() for p in ad.mlp(layer).parameters()) + layer.post_attention_layernorm.weight.numel()
    _remove(model, [1], [1])
    assert ad.total_params() == before - attn - mlp
    assert sum(p.numel() for p in ad.layers[1].parameters()) == 0  # nothing left in the block but its no-ops


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_generate_with_cache(family: str) -> None:
    """Greedy generation with the KV cache equals generation without it and the masked model's, with layer 0's
    attention removed (the cache's length is read from layer 0) and a sliding window on Mistral."""
    model = tiny_family(family, num_layers=4)
    masked = copy.deepcopy(model)
    _remove(model, [0, 3], [2])
    _mask(masked, [0, 3], [2])
    prompt = torch.randint(3, 259, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 2}
    cached = model.generate(prompt, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))
    assert torch.equal(cached, masked.generate(prompt, use_cache=True, **kw))


def test_save_load_pruned_round_trip(tmp_path) -> None:
    from prunelab.stages.io.loader import load_pruned
    from prunelab.stages.surgery.apply import set_width_config

    model = tiny_family("qwen3", num_layers=4)
    _remove(model, [1, 3], [0])
    ad = adapter_for(model)
    shapes = [{"num_attention_heads": g.n_q, "num_key_value_heads": g.n_kv, "intermediate_size": g.intermediate}
              for g in ad.geometries()]
    set_width_config(model, shapes)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["prunelab_layer_shapes"]
    assert saved[1] == {"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 128}
    assert saved[0]["intermediate_size"] == 0
    loaded = load_pruned(tmp_path)
    assert adapter_for(loaded).total_params() == ad.total_params()
    assert adapter_for(loaded).geometries() == ad.geometries()
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)  # same weights, same ops


def test_criterion_matches_hand_computation(calib: torch.Tensor) -> None:
    """The official code's formulation (X = the input of the sublayer's pre-norm, Y = X + the sublayer's output,
    LLM-Drop ``layer_drop_norm``), computed here from hooks on the decoder layer and its sublayers, equals the
    criterion's from the one calibration pass (float64: only the order of summation differs)."""
    from prunelab.stages.calibration.full import collect_stats
    from prunelab.stages.criteria.base import CriterionInputs
    from prunelab.stages.criteria.sublayer import sublayer_cosine

    model = tiny_llama(num_layers=4).double()
    ad = adapter_for(model)
    n = ad.num_blocks
    cos_sum = torch.zeros(n, 2, dtype=torch.float64)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(ad.layers):
        def pre(_m, args, kwargs, i=i):
            seen[f"x{i}"] = args[0] if args else kwargs["hidden_states"]

        def attn(_m, _a, out, i=i):
            x = seen[f"x{i}"]
            seen[f"m{i}"] = x + out[0]
            cos_sum[i, 0] += torch.nn.functional.cosine_similarity(x, x + out[0], dim=-1).sum()

        def mlp(_m, _a, out, i=i):
            m = seen[f"m{i}"]
            cos_sum[i, 1] += torch.nn.functional.cosine_similarity(m, m + out, dim=-1).sum()

        hooks += [layer.register_forward_pre_hook(pre, with_kwargs=True), ad.attention(layer).register_forward_hook(attn),
                  ad.mlp(layer).register_forward_hook(mlp)]
    with torch.no_grad():
        for row in calib:
            model(row[None], use_cache=False)
    for h in hooks:
        h.remove()
    hand = 1 - cos_sum / calib.numel()
    stats = collect_stats(model, calib, {"sublayers"}, batch_size=2, progress=False)
    result = sublayer_cosine(CriterionInputs(model=model, stats=stats)).to_json()
    torch.testing.assert_close(torch.tensor(result["attention"], dtype=torch.float64), hand[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor(result["mlp"], dtype=torch.float64), hand[:, 1], rtol=0, atol=1e-12)
    assert result["scores"] == pytest.approx((hand[:, 0] + hand[:, 1]).tolist(), abs=1e-12)


def _settings(**kw):
    from prunelab.stages.prune import prune_config

    return prune_config({"type": "prune", "units": "sublayers", "criterion": "sublayer_cosine", **kw})


def test_plan_applies_to_a_fresh_copy_identically() -> None:
    from prunelab.stages.selection.sublayers import make_sublayer_plan
    from prunelab.stages.surgery.apply import apply_plan
    from prunelab.stages.surgery.plan import PlanError, SublayerPlan, load_plan

    model = tiny_llama(num_layers=6)
    fresh = copy.deepcopy(model)
    result = {"scores": [0.0] * 6, "attention": [0.5, 0.1, 0.3, 0.05, 0.9, 0.2], "mlp": [0.7, 0.6, 0.04, 0.8, 0.95, 0.4]}
    plan = make_sublayer_plan(result, _settings(sublayers="both", num_sublayers=3), adapter_for(model))
    assert (plan.removed_attention, plan.removed_mlp) == ([1, 3], [2])  # joint ranking: 0.04 (mlp 2), 0.05, 0.1
    apply_plan(model, plan)
    assert adapter_for(model).total_params() == plan.params_after
    assert "attention removed in layers [1, 3], MLP removed in layers [2]" in plan.describe()
    data = json.loads(json.dumps(plan.to_json()))
    assert isinstance(load_plan(data), SublayerPlan)
    apply_plan(fresh, data)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model.config.prunelab_layer_shapes == fresh.config.prunelab_layer_shapes
    with pytest.raises(PlanError, match="already pruned"):
        apply_plan(model, data)


def test_ratio_target_and_kind_limits() -> None:
    from prunelab.stages.selection.sublayers import make_sublayer_plan, sublayer_params

    model = tiny_llama(num_layers=6)
    ad = adapter_for(model)
    result = {"scores": [0.0] * 6, "attention": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "mlp": [0.9] * 6}
    attn = sublayer_params(ad)["attention", 0]
    ratio = 2.4 * attn / ad.total_params()  # nearest prefix: 2 attention sublayers
    plan = make_sublayer_plan(result, _settings(ratio=ratio), ad)
    assert plan.removed_attention == [0, 1] and plan.removed_mlp == []
    # attention only: never the last attention sublayer
    plan = make_sublayer_plan(result, _settings(ratio=0.9), ad)
    assert len(plan.removed_attention) == 5
    with pytest.raises(ValueError, match="choose at most 5"):
        make_sublayer_plan(result, _settings(num_sublayers=6), ad)


def test_other_families_are_refused_by_name() -> None:
    from prunelab.stages.selection.sublayers import make_sublayer_plan

    model = tiny_family("phi3", num_layers=2)
    with pytest.raises(ValueError, match=r"phi3.*supported: .*granite, llama, mistral, olmo2, .*qwen2, qwen3"):
        make_sublayer_plan({"scores": [0, 0], "attention": [0, 1], "mlp": [0, 1]},
                           _settings(num_sublayers=1), adapter_for(model))


@pytest.mark.parametrize(("extra", "message"), [
    ({"num_blocks": 2, "num_sublayers": 1}, "num_blocks is a depth setting"),
    ({"num_sublayers": 1, "allocation": "global"}, "allocation is a width setting"),
    ({}, "give exactly one target"),
    ({"num_sublayers": 1, "ratio": 0.2}, "give exactly one target"),
    ({"num_sublayers": 1, "sublayers": "heads"}, "attention"),
])
def test_bad_settings_name_the_field(extra: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        _settings(**extra)


def test_sublayer_keys_refused_in_other_modes() -> None:
    from pydantic import ValidationError

    from prunelab.stages.prune import prune_config

    with pytest.raises(ValidationError, match="num_sublayers is a setting of units: sublayers"):
        prune_config({"type": "prune", "criterion": "block_influence", "num_blocks": 1, "num_sublayers": 2})


def test_debug_recipe_through_the_cli(tmp_path) -> None:
    from prunelab.run import main
    from prunelab.stages.io.loader import load_pruned

    assert main(["recipes/debug-sublayer.yaml", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    run = tmp_path / "debug-sublayer"
    plan = json.loads(next(run.glob("*-prune/plan.json")).read_text())
    assert plan["kind"] == "sublayers" and plan["num_removed"] == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["params_after"] == plan["params_after"]
    shapes = json.loads((run / "model" / "config.json").read_text())["prunelab_layer_shapes"]
    assert sum(s["num_attention_heads"] == 0 for s in shapes) == len(plan["removed_attention"])
    assert sum(s["intermediate_size"] == 0 for s in shapes) == len(plan["removed_mlp"])
    assert adapter_for(load_pruned(run / "model")).total_params() == plan["params_after"]
    # resume re-applies plan.json to a fresh model
    assert main(["recipes/debug-sublayer.yaml", "--output-dir", str(tmp_path), "--no-progress", "--resume"]) == 0


def test_a_pruned_model_offers_only_its_present_sublayers() -> None:
    """Re-scoring a pruned model gives its no-ops importance 0 (cos = 1); selection skips them instead of failing."""
    from prunelab.stages.selection.sublayers import make_sublayer_plan

    model = tiny_llama(num_layers=4)
    _remove(model, [0, 1], [])
    result = {"scores": [0.0] * 4, "attention": [0.0, 0.0, 0.3, 0.2], "mlp": [0.9] * 4}
    plan = make_sublayer_plan(result, _settings(num_sublayers=1), adapter_for(model))
    assert plan.removed_attention == [3]
    with pytest.raises(ValueError, match="only 1 may be removed"):
        make_sublayer_plan(result, _settings(num_sublayers=2), adapter_for(model))


def test_statistics_refused_where_the_layout_differs(calib: torch.Tensor) -> None:
    from prunelab.stages.calibration.full import collect_stats

    with pytest.raises(ValueError, match=r"Gemma.*gemma2.*supported: .*llama"):
        collect_stats(tiny_family("gemma2", num_layers=2), calib, {"sublayers"}, progress=False)


def test_the_torch_free_family_table_matches_the_adapters() -> None:
    """--dry-run refuses sublayer removal from SUBLAYER_FAMILIES without importing torch; it must say what the
    adapters (SUBLAYER_REMOVAL) say, for every registered family."""
    from prunelab.stages.arch import FAMILY_MODULES, SUBLAYER_FAMILIES, adapter_class

    assert sorted(SUBLAYER_FAMILIES) == sorted(t for t in FAMILY_MODULES if adapter_class(t).SUBLAYER_REMOVAL)


@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_dry_run_refuses_sublayers_on_other_families(family: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any model loads, naming the stages and the fix (was: at calibration / prune time)."""
    from prunelab.run import main

    rc = main(["recipes/debug-sublayer.yaml", f"model.source=tiny-random-{family}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "stages.score: sublayer removal needs the Llama layout" in err and f"model_type {family!r}" in err
    assert "stages.prune: sublayer removal" in err and "use units: blocks or width" in err
