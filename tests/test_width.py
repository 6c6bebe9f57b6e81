"""Width pruning: masking a unit == removing it, FLAP compensation helps, reloads, coupling, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from prunelab.recipe import RecipeError, validate
from prunelab.stages.arch.llama import UNIT_MEMBERS
from prunelab.stages.calibration.full import collect_stats
from prunelab.stages.calibration.width import geometry
from prunelab.stages.criteria.base import CriterionInputs
from prunelab.stages.criteria.width import (
    flap,
    magnitude,
    random,
    taylor,
    taylor_element2,
    taylor_vector,
    wanda_sp,
)
from prunelab.stages.selection.width import select_global, select_uniform, summarize
from prunelab.stages.surgery.apply import PlanError, apply_plan
from prunelab.stages.surgery.compensation import bias_compensation
from prunelab.stages.surgery.plan import WidthPlan


def _mask(model, layer_idx: int, kind: str, idx: int) -> None:
    """Zero a unit's weights in place (the 'masking' twin of physical removal)."""
    layer = model.model.layers[layer_idx]
    geo = geometry(layer)
    hd = geo.head_dim
    with torch.no_grad():
        if kind == "mlp":
            layer.mlp.gate_proj.weight[idx] = 0
            layer.mlp.up_proj.weight[idx] = 0
            layer.mlp.down_proj.weight[:, idx] = 0
            return
        heads = [idx] if kind == "q_head" else [idx * geo.q_per_group + j for j in range(geo.q_per_group)]
        for h in heads:
            layer.self_attn.q_proj.weight[h * hd:(h + 1) * hd] = 0
            layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
        if kind == "kv_group":
            layer.self_attn.k_proj.weight[idx * hd:(idx + 1) * hd] = 0
            layer.self_attn.v_proj.weight[idx * hd:(idx + 1) * hd] = 0


def _plan(model, layers: dict[int, dict[str, list[int]]]) -> WidthPlan:
    geos = [geometry(layer) for layer in model.model.layers]
    full = {i: layers.get(i, {"q_heads": [], "kv_heads": [], "mlp": []}) for i in range(len(geos))}
    return WidthPlan(layers={str(i): r for i, r in layers.items()}, shapes_before=summarize({}, geos),
                     shapes_after=summarize(full, geos))


CASES = [
    ("mlp channels", {1: {"q_heads": [], "kv_heads": [], "mlp": [3, 17, 100]}}, [(1, "mlp", 3), (1, "mlp", 17), (1, "mlp", 100)]),
    ("KV group", {2: {"q_heads": [2, 3], "kv_heads": [1], "mlp": []}}, [(2, "kv_group", 1)]),
    ("query heads uniformly across groups", {0: {"q_heads": [0, 3], "kv_heads": [], "mlp": []}}, [(0, "q_head", 0), (0, "q_head", 3)]),
]


def _uniform_layers(model, removed):
    return {i: removed for i in range(len(model.model.layers))}


@pytest.mark.parametrize("why,layers,units", CASES, ids=[c[0] for c in CASES])
def test_masking_equals_physical_removal(tiny_model, calib, why, layers, units):
    masked = copy.deepcopy(tiny_model)
    for layer_idx, kind, idx in units:
        _mask(masked, layer_idx, kind, idx)
    apply_plan(tiny_model, _plan(tiny_model, layers))
    with torch.no_grad():
        diff = (masked(calib).logits - tiny_model(calib).logits).abs().max().item()
    assert diff <= 1e-5, diff
    prompt = torch.tensor([[0, 5, 9, 11, 40]])
    with torch.no_grad():  # the KV cache still works with fewer heads
        a = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=2)
        b = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(a, b)


def test_kv_group_split_is_refused(tiny_model):
    # 4 query heads / 2 KV heads: keeping q heads 0 and 2 but dropping KV head 1 orphans q head 2
    bad = _plan(tiny_model, {0: {"q_heads": [1, 3], "kv_heads": [1], "mlp": []}})
    with pytest.raises(PlanError, match="split"):
        apply_plan(tiny_model, bad)
    uneven = _plan(tiny_model, {0: {"q_heads": [0], "kv_heads": [], "mlp": []}})
    with pytest.raises(PlanError, match="cannot share|split"):
        apply_plan(copy.deepcopy(tiny_model), uneven)


def test_mlp_coupling_matches_torch_pruning_dependency_graph(tiny_model):
    tp = pytest.importorskip("torch_pruning")
    ids = torch.randint(3, 200, (1, 8))
    graph = tp.DependencyGraph().build_dependency(tiny_model, example_inputs={"input_ids": ids},
                                                  output_transform=lambda out: out.logits)
    names = {m: n for n, m in tiny_model.named_modules()}
    for i, layer in enumerate(tiny_model.model.layers):
        group = graph.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, idxs=[2, 5])
        found = set()
        for dep, idxs in group:
            module = dep.target.module
            if isinstance(module, torch.nn.Linear):
                side = "out" if dep.handler == tp.prune_linear_out_channels else "in"
                found.add((names[module].removeprefix(f"model.layers.{i}."), side))
                assert sorted(idxs) == [2, 5]
        assert found == set(UNIT_MEMBERS["mlp"])


def test_head_coupling_matches_torch_pruning_dependency_graph(monkeypatch):
    """Attention heads cross-checked against torch-pruning's DependencyGraph, on a multi-head (no GQA) model.

    Why the graph hung on q/k/o_proj (see the brief): RoPE's ``rotate_half`` (slice + cat) closes a cycle through
    which every pass shifts the channel indices by head_dim/2, so the group search never revisits an index set and
    never ends. RoPE mixes dims i and i + head_dim/2 of the *same* head only, so tracing with it replaced by the
    identity leaves the head coupling unchanged, and the groups then resolve in ~1 ms. With GQA the graph is no
    reference: SDPA's ``enable_gqa`` is treated as element-wise, so it pairs query channel c with key channel c
    instead of key head c // head_dim with query heads (c // head_dim)·r … — our KV groups (and their exact
    mask-vs-removal tests) are the GQA check; this test checks members and rows where the graph is right."""
    tp = pytest.importorskip("torch_pruning")
    import warnings

    from transformers.models.llama import modeling_llama

    from prunelab.stages.arch.base import heads_to_rows as _heads_to_rows
    from prunelab.stages.io.tiny import tiny_llama

    model = tiny_llama(num_layers=2, heads=4, kv_heads=4)
    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", lambda q, k, *args, **kwargs: (q, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": torch.randint(3, 200, (1, 8))},
                                                      output_transform=lambda out: out.logits)
    names = {m: n for n, m in model.named_modules()}
    hd = model.config.hidden_size // model.config.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        for head in range(4):
            rows = _heads_to_rows([head], hd)
            group = graph.get_pruning_group(layer.self_attn.k_proj, tp.prune_linear_out_channels, idxs=rows)
            found = {}
            for dep, idxs in group:
                if isinstance(dep.target.module, torch.nn.Linear):
                    side = "out" if dep.handler == tp.prune_linear_out_channels else "in"
                    found[(names[dep.target.module].removeprefix(f"model.layers.{i}."), side)] = sorted(int(x) for x in idxs)
            assert found == {member: rows for member in UNIT_MEMBERS["kv_group"]}


def test_flap_bias_compensation_brings_block_outputs_closer(tiny_model, calib):
    stats = collect_stats(tiny_model, calib, {"activations"}, batch_size=3, progress=False)
    scores = flap(CriterionInputs(tiny_model, stats)).layers
    geos = [geometry(layer) for layer in tiny_model.model.layers]
    chosen = select_uniform(scores, geos, list(range(6)), "kv_group", True, 0.3, None)
    means = {"o_proj": [s.mean for s in stats.o_proj], "down_proj": [s.mean for s in stats.down_proj]}
    side = bias_compensation(tiny_model, chosen, means)
    plan = _plan(tiny_model, chosen)
    plain, comp = apply_plan(copy.deepcopy(tiny_model), plan), apply_plan(copy.deepcopy(tiny_model), plan, side)
    from prunelab.stages.arch.llama import adapter_for

    dense_ad, plain_ad, comp_ad = adapter_for(tiny_model), adapter_for(plain), adapter_for(comp)
    with torch.no_grad():
        states = dense_ad.boundary_states(calib)
        inputs = dense_ad.prepare(states[0])
        err_plain = err_comp = 0.0
        for i in range(6):  # each block fed the dense input: what compensation is meant to preserve
            err_plain += (plain_ad.run_block(i, states[i], inputs) - states[i + 1]).pow(2).sum().item()
            err_comp += (comp_ad.run_block(i, states[i], inputs) - states[i + 1]).pow(2).sum().item()
    assert err_comp < err_plain
    assert comp.config.attention_bias and comp.config.mlp_bias
    assert all(torch.count_nonzero(layer.self_attn.q_proj.bias) == 0 for layer in comp.model.layers)
    assert all(torch.count_nonzero(layer.mlp.gate_proj.bias) == 0 for layer in comp.model.layers)


@pytest.mark.parametrize("compensate", [False, True])
def test_uniform_result_reloads_in_vanilla_transformers(tiny_model, calib, tmp_path, compensate):
    from transformers import AutoModelForCausalLM

    stats = collect_stats(tiny_model, calib, {"activations"}, progress=False)
    scores = wanda_sp(CriterionInputs(tiny_model, stats)).layers
    geos = [geometry(layer) for layer in tiny_model.model.layers]
    chosen = select_uniform(scores, geos, list(range(6)), "q_head", True, 0.5, None)
    means = {"o_proj": [s.mean for s in stats.o_proj], "down_proj": [s.mean for s in stats.down_proj]}
    side = bias_compensation(tiny_model, chosen, means) if compensate else None
    apply_plan(tiny_model, _plan(tiny_model, chosen), side)
    cfg = tiny_model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.head_dim) == (2, 2, 64, 16)
    tiny_model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "prunelab_layer_shapes" not in json.loads((tmp_path / "config.json").read_text())
    with torch.no_grad():
        assert (fresh(calib).logits - tiny_model(calib).logits).abs().max().item() <= 1e-5


def test_heterogeneous_result_reloads_through_the_prunelab_loader(tiny_model, calib, tmp_path):
    from prunelab.stages.io.loader import load_pruned

    stats = collect_stats(tiny_model, calib, {"activations"}, progress=False)
    scores = flap(CriterionInputs(tiny_model, stats)).layers
    geos = [geometry(layer) for layer in tiny_model.model.layers]
    total = sum(p.numel() for p in tiny_model.parameters())
    chosen = select_global(scores, geos, list(range(6)), True, "kv_group", int(0.15 * total))
    means = {"o_proj": [s.mean for s in stats.o_proj], "down_proj": [s.mean for s in stats.down_proj]}
    apply_plan(tiny_model, _plan(tiny_model, chosen), bias_compensation(tiny_model, chosen, means))
    assert tiny_model.config.prunelab_layer_shapes and len({json.dumps(s) for s in tiny_model.config.prunelab_layer_shapes}) > 1
    removed = total - sum(p.numel() for p in tiny_model.parameters())
    assert abs(removed - 0.15 * total) < 0.02 * total
    tiny_model.save_pretrained(tmp_path)
    fresh = load_pruned(tmp_path)
    with torch.no_grad():
        assert (fresh(calib).logits - tiny_model(calib).logits).abs().max().item() <= 1e-5


def test_every_width_criterion_scores_every_unit(tiny_model, calib):
    stats = collect_stats(tiny_model, calib, {"activations", "grad", "fisher"}, batch_size=1, progress=False)
    inp = CriterionInputs(tiny_model, stats, seed=0)
    for fn in (flap, wanda_sp, taylor, taylor_element2, taylor_vector, magnitude, random):
        layers = fn(inp).layers
        assert len(layers) == 6
        assert all(len(l["q_heads"]) == 4 and len(l["kv_groups"]) == 2 and len(l["mlp"]) == 128 for l in layers)
        assert not any(math.isnan(v) for l in layers for v in l["mlp"])


def test_taylor_element1_is_abs_weight_times_mean_gradient(tiny_model, calib):
    stats = collect_stats(tiny_model, calib, {"grad"}, batch_size=3, progress=False)
    layers = taylor(CriterionInputs(tiny_model, stats)).layers
    tiny_model.zero_grad()
    tiny_model(calib, labels=calib).loss.backward()
    mlp = tiny_model.model.layers[2].mlp
    c = 7
    expected = ((mlp.gate_proj.weight[c] * mlp.gate_proj.weight.grad[c]).abs().sum()
                + (mlp.up_proj.weight[c] * mlp.up_proj.weight.grad[c]).abs().sum()
                + (mlp.down_proj.weight[:, c] * mlp.down_proj.weight.grad[:, c]).abs().sum()).item()
    assert layers[2]["mlp"][c] == pytest.approx(expected, rel=1e-4)
    tiny_model.zero_grad()


BASE = {
    "name": "w", "model": {"source": "tiny-random-llama"},
    "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 2, "seq_len": 16},
        "score": {"type": "score", "units": "width", "criteria": ["flap"]},
        "prune": {"type": "prune", "units": "width", "criterion": "flap", "layer_ratio": 0.25},
    },
}


def _width(**prune):
    raw = copy.deepcopy(BASE)
    raw["stages"]["prune"].update(prune)
    return raw


@pytest.mark.parametrize("prune,expected", [
    ({"criterion": "flapp"}, "unknown width criterion 'flapp'"),
    ({"attention": "head_dim"}, "head_dim never changes"),
    ({"num_blocks": 2}, "num_blocks is a depth target"),
    ({"ratio": 0.2}, "exactly one width target"),
    ({"allocation": "global"}, "needs `ratio`"),
    ({"layer_ratio": None, "ratio": 0.2, "allocation": "global", "attention": "q_head"}, "ranks whole KV groups"),
    ({"layers": [5, 2]}, "start < end"),
], ids=["unknown criterion", "head_dim", "depth target", "two targets", "global needs ratio", "global q_head", "layer range"])
def test_bad_width_recipes(prune, expected):
    with pytest.raises(RecipeError) as exc:
        validate(_width(**prune))
    assert expected in str(exc.value)


def test_ratio_that_removes_every_head_fails_right_after_load(tmp_path, capsys):
    from prunelab.run import main

    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_width(layer_ratio=0.9), sort_keys=False))
    assert main([str(path), "--output-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "would remove every head" in err or "would remove all" in err
    assert not (tmp_path / "w" / "02-calibrate" / "done.json").exists()  # failed before calibration


def test_owl_offsets_favour_outlier_rich_layers_and_keep_the_mean(tiny_model, calib):
    from prunelab.stages.calibration.width import summary_tensors
    from prunelab.stages.selection.owl import owl_offsets

    stats = collect_stats(tiny_model, calib, {"activations"}, progress=False)
    with torch.no_grad():  # plant strong outliers in layer 3
        tiny_model.model.layers[3].mlp.down_proj.weight[:, :8] *= 40
    offs = owl_offsets(tiny_model, summary_tensors(stats)["sq_norm"], list(range(6)), m=5.0, lam=0.08)
    assert sum(offs) == pytest.approx(0.0, abs=1e-12)
    assert min(offs) == pytest.approx(offs[3]) and max(offs) - min(offs) == pytest.approx(0.16)
    geos = [geometry(layer) for layer in tiny_model.model.layers]
    scores = magnitude(CriterionInputs(tiny_model, stats)).layers
    chosen = select_uniform(scores, geos, list(range(6)), "none", True, 0.25, None, offs)
    assert len(chosen[3]["mlp"]) == min(len(r["mlp"]) for r in chosen.values())


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_uniform_width_pruning_across_layouts_reloads_vanilla(model_type, calib, tmp_path):
    """Qwen2 has q/k/v biases: they must follow the kept rows."""
    from transformers import AutoModelForCausalLM

    from prunelab.stages.io.tiny import tiny_llama

    model = tiny_llama(num_layers=3, model_type=model_type)
    if model_type == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_()
    masked = copy.deepcopy(model)
    for i in range(3):
        for k, idx in (("kv_group", 0), ("mlp", 1), ("mlp", 9)):
            _mask(masked, i, k, idx)
            if k == "kv_group" and model_type == "qwen2":
                hd = masked.model.layers[i].self_attn.head_dim
                with torch.no_grad():
                    for name in ("q_proj", "k_proj", "v_proj"):
                        getattr(masked.model.layers[i].self_attn, name).bias[: (2 if name == "q_proj" else 1) * hd] = 0
    removed = {"q_heads": [0, 1], "kv_heads": [0], "mlp": [1, 9]}
    apply_plan(model, _plan(model, {i: removed for i in range(3)}))
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        out = model(calib).logits
        assert (fresh(calib).logits - out).abs().max().item() <= 1e-5
        assert (masked(calib).logits - out).abs().max().item() <= 1e-5


def test_taylor_element2_uses_per_window_fisher(tiny_model, calib):
    """element2 = |w·ḡ − ½ w² F| with ḡ the mean of per-window gradients and F the mean of their squares."""
    stats = collect_stats(tiny_model, calib, {"grad", "fisher"}, batch_size=1, progress=False)
    layers = taylor_element2(CriterionInputs(tiny_model, stats)).layers
    grads = []
    for row in calib:
        tiny_model.zero_grad()
        tiny_model(row[None], labels=row[None]).loss.backward()
        grads.append(tiny_model.model.layers[1].mlp.up_proj.weight.grad[4].clone())
    tiny_model.zero_grad()
    g = torch.stack(grads)
    w = tiny_model.model.layers[1].mlp.up_proj.weight[4].detach()
    up_part = (w * g.mean(0) - 0.5 * w * w * (g * g).mean(0)).abs().sum().item()
    stats2 = collect_stats(tiny_model, calib, {"grad", "fisher"}, batch_size=1, progress=False)
    assert torch.allclose(stats2.fisher["model.layers.1.mlp.up_proj.weight"][4], (g * g).mean(0), rtol=1e-4, atol=1e-12)
    # the channel score is the sum over gate row, up row and down column; check the up-row share
    from prunelab.stages.criteria.width import _member_scores

    members = _member_scores(tiny_model.model.layers[1], geometry(tiny_model.model.layers[1]),
                             lambda n, w_: (w_.detach() * stats.grad_mean[f"model.layers.1.{n}.weight"]
                                            - 0.5 * w_.detach() ** 2 * stats.fisher[f"model.layers.1.{n}.weight"]).abs())
    assert members["mlp"][1][4].item() == pytest.approx(up_part, rel=1e-4)
    assert layers[1]["mlp"][4] == pytest.approx(sum(m[4].item() for m in members["mlp"]), rel=1e-6)


def test_uniform_llama_head_count_that_llamaconfig_refuses_goes_through_the_loader(calib, tmp_path):
    """transformers 5's LlamaConfig demands hidden_size % num_attention_heads == 0 even with an explicit head_dim
    (Llama-7B keeping 24 of 32 heads fails it). Such a uniform result is saved with per-layer shapes instead:
    it saves, vanilla refuses it loudly, and the prunelab loader gives the same logits."""
    from transformers import AutoModelForCausalLM

    from prunelab.stages.io.loader import load_pruned
    from prunelab.stages.io.tiny import tiny_llama

    model = tiny_llama(num_layers=2, heads=4, kv_heads=4)
    removed = {"q_heads": [1], "kv_heads": [1], "mlp": [0, 3]}  # 3 heads: 64 % 3 != 0
    apply_plan(model, _plan(model, {0: removed, 1: removed}))
    assert model.config.prunelab_layer_shapes[0]["num_attention_heads"] == 3
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # the config says 4 heads, the weights hold 3
        AutoModelForCausalLM.from_pretrained(tmp_path)
    fresh = load_pruned(tmp_path)
    with torch.no_grad():
        assert (fresh(calib).logits - model(calib).logits).abs().max().item() <= 1e-5
