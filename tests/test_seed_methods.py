"""The seed papers' methods: AlphaPruning allocation, optimal (OBS/APT) compensation, LaCo layer collapse."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from prunelab.stages.calibration.full import collect_stats
from prunelab.stages.calibration.width import geometry, summary_tensors
from prunelab.stages.selection.alpha import alpha_offsets, esd, hill_alpha, layer_alphas
from prunelab.stages.selection.width import select_uniform, summarize
from prunelab.stages.surgery.apply import apply_plan
from prunelab.stages.surgery.compensation import (
    bias_compensation,
    obs_remove,
    optimal_compensation,
    optimal_layer,
    output_error,
)


# ----------------------------------------------------------------------------- AlphaPruning
def _matrix_with_tail(alpha: float, n: int = 400, seed: int = 0) -> torch.Tensor:
    """W = U diag(√λ) Vᵀ whose ESD (eigenvalues of WᵀW) is a Pareto sample with density ∝ λ^(−alpha)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    lam = (1 - u) ** (-1 / (alpha - 1))  # inverse CDF of Pareto(x_min = 1, exponent alpha)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q1 @ torch.diag(lam.sqrt()) @ q2.T


@pytest.mark.parametrize("true_alpha", [2.0, 3.0, 4.5])
def test_hill_estimator_recovers_a_known_power_law_tail(true_alpha):
    w = _matrix_with_tail(true_alpha)
    assert torch.allclose(esd(w), torch.sort(torch.linalg.svdvals(w) ** 2).values, rtol=1e-6, atol=1e-8)
    estimates = [hill_alpha(esd(_matrix_with_tail(true_alpha, seed=s))) for s in range(3)]
    assert sum(estimates) / 3 == pytest.approx(true_alpha, rel=0.12)


def test_heavier_tailed_layers_are_pruned_less_and_the_mean_ratio_is_kept(tiny_model):
    layers = list(range(6))
    with torch.no_grad():  # give layer 2 heavy-tailed matrices: a few huge singular directions
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            lin = tiny_model.model.layers[2].get_submodule(name)
            u, s, vh = torch.linalg.svd(lin.weight, full_matrices=False)
            s = s * torch.logspace(1.5, 0, s.numel())
            lin.weight.copy_(u @ torch.diag(s) @ vh)
    alphas = layer_alphas(tiny_model)
    assert min(range(6), key=lambda i: alphas[i]) == 2
    offs = alpha_offsets(alphas, layers, epsilon=0.1)
    assert sum(offs) == pytest.approx(0.0, abs=1e-12)
    assert max(offs) - min(offs) == pytest.approx(0.2)
    assert min(offs) == offs[2]
    # offsets keep their order relative to α (linear map)
    order_a = sorted(layers, key=lambda i: alphas[i])
    assert [offs[i] for i in order_a] == sorted(offs)


def test_alpha_allocation_through_the_prune_stage(tiny_model, calib):
    from prunelab.stages.criteria.base import CriterionInputs
    from prunelab.stages.criteria.width import magnitude
    from prunelab.stages.prune import prune_config
    from prunelab.stages.selection.planning import make_width_plan

    stats = collect_stats(tiny_model, calib, {"activations"}, progress=False)
    scores = magnitude(CriterionInputs(tiny_model, stats)).to_json()
    total = sum(p.numel() for p in tiny_model.parameters())
    cfg = prune_config({"type": "prune", "units": "width", "criterion": "magnitude", "ratio": 0.2,
                                      "allocation": {"type": "alpha", "epsilon": 0.15}, "attention": "none"})
    plan, side = make_width_plan(scores, cfg, tiny_model, summary_tensors(stats))
    assert plan.layer_alpha and len(plan.layer_alpha) == 6 and not side
    widths = [s.intermediate_size for s in plan.shapes_after]
    lowest_alpha = min(range(6), key=lambda i: plan.layer_alpha[i])
    assert widths[lowest_alpha] == max(widths)  # the heaviest tail keeps the most channels
    apply_plan(tiny_model, plan, side)
    assert abs((total - sum(p.numel() for p in tiny_model.parameters())) - 0.2 * total) < 0.02 * total


# ----------------------------------------------------------------------------- optimal compensation
def _layer_data(seed: int = 0, n: int = 512, d: int = 24, out: int = 10):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix + torch.linspace(-1, 2, d, dtype=torch.float64)
    w = torch.randn(out, d, generator=gen, dtype=torch.float64)
    return x, w


def test_obs_update_equals_least_squares_on_the_kept_columns():
    x, w = _layer_data()
    removed = [1, 5, 6, 20]
    keep = [j for j in range(w.shape[1]) if j not in removed]
    h = x.T @ x
    new = obs_remove(w, h, removed, damping=1e-3)
    assert new[:, removed].abs().max() == 0
    hd = h + 1e-3 * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    lstsq = w @ hd[:, keep] @ torch.linalg.inv(hd[keep][:, keep])
    assert torch.allclose(new[:, keep], lstsq, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimal_compensation_beats_none_and_flap_bias_on_calibration_data(seed):
    x, w = _layer_data(seed)
    removed = [0, 3, 4, 11, 17, 23]
    keep = [j for j in range(w.shape[1]) if j not in removed]
    gram, total, count = x.T @ x, x.sum(0), x.shape[0]
    none_err = output_error(w, None, x, w[:, keep], None, keep)
    bias_err = output_error(w, None, x, w[:, keep], w[:, removed] @ x[:, removed].mean(0), keep)
    nw, nb = optimal_layer(w, None, gram, total, count, removed, damping=1e-6, with_bias=True)
    opt_err = output_error(w, None, x, nw, nb, keep)
    nw2, _ = optimal_layer(w, None, gram, total, count, removed, damping=1e-6, with_bias=False)
    weights_only_err = output_error(w, None, x, nw2, None, keep)
    assert opt_err <= bias_err <= none_err
    assert opt_err <= weights_only_err <= none_err
    assert opt_err < 0.9 * bias_err  # a real improvement, not a tie


def test_removing_no_channels_changes_nothing():
    x, w = _layer_data()
    b = torch.randn(w.shape[0], dtype=torch.float64)
    nw, nb = optimal_layer(w, b, x.T @ x, x.sum(0), x.shape[0], [], damping=0.01, with_bias=True)
    assert torch.equal(nw, w) and torch.equal(nb, b)
    assert torch.equal(obs_remove(w, x.T @ x, []), w)


def test_optimal_compensation_on_a_model_brings_block_outputs_closest(tiny_model, calib):
    from prunelab.stages.arch.llama import adapter_for
    from prunelab.stages.criteria.base import CriterionInputs
    from prunelab.stages.criteria.width import flap

    stats = collect_stats(tiny_model, calib, {"activations", "hessian"}, batch_size=3, progress=False)
    means = summary_tensors(stats)
    scores = flap(CriterionInputs(tiny_model, stats)).layers
    geos = [geometry(layer) for layer in tiny_model.model.layers]
    chosen = select_uniform(scores, geos, list(range(6)), "kv_group", True, 0.3, None)
    full = {i: chosen.get(i, {"q_heads": [], "kv_heads": [], "mlp": []}) for i in range(6)}
    plan = {"kind": "width", "layers": {str(i): r for i, r in chosen.items()}, "shapes_before": summarize({}, geos),
            "shapes_after": summarize(full, geos)}
    variants = {
        "none": apply_plan(copy.deepcopy(tiny_model), plan),
        "bias": apply_plan(copy.deepcopy(tiny_model), plan, bias_compensation(tiny_model, chosen, means)),
        "optimal": apply_plan(copy.deepcopy(tiny_model), plan, optimal_compensation(tiny_model, chosen, means["gram"], 1e-4, True)),
    }
    dense = adapter_for(tiny_model)
    err = dict.fromkeys(variants, 0.0)
    with torch.no_grad():
        states = dense.boundary_states(calib)
        inputs = dense.prepare(states[0])
        for name, m in variants.items():
            ad = adapter_for(m)
            for i in range(6):  # each block fed the dense input, as the compensation assumes
                err[name] += (ad.run_block(i, states[i], inputs) - states[i + 1]).pow(2).sum().item()
    assert err["optimal"] < err["bias"] < err["none"]


def test_optimal_plan_reapplies_from_its_side_file(tiny_model, calib, tmp_path):
    import yaml

    from prunelab.run import main

    recipe = yaml.safe_load(Path("recipes/debug-width.yaml").read_text())
    recipe["stages"]["prune"].update(compensation={"type": "optimal", "damping": 0.01})
    path = tmp_path / "opt.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main([str(path), "--output-dir", str(tmp_path), "--no-progress"]) == 0
    run = tmp_path / recipe["name"]
    prune_dir = next(run.glob("*-prune"))
    import json

    from safetensors.torch import load_file

    from prunelab.recipe import ModelConfig
    from prunelab.stages.io.models import load_model

    plan = json.loads((prune_dir / "plan.json").read_text())
    assert plan["side_file"] and plan["target"]["compensation"] == {"type": "optimal", "damping": 0.01, "bias": True}
    side = load_file(str(prune_dir / plan["side_file"]))
    assert any(k.endswith("down_proj.weight") for k in side) and any(k.endswith("down_proj.bias") for k in side)
    fresh, _ = load_model(ModelConfig.model_validate(recipe["model"]))
    a = apply_plan(copy.deepcopy(fresh), plan, side)
    b = apply_plan(copy.deepcopy(fresh), plan, side)
    for (ka, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), ka


# ----------------------------------------------------------------------------- LaCo
def test_rdsc_merge_is_the_paper_formula(tiny_model):
    from prunelab.stages.surgery.merge import rdsc_merge

    layers = tiny_model.model.layers
    before = {i: {n: p.detach().clone() for n, p in layers[i].named_parameters()} for i in (2, 3, 4)}
    rdsc_merge(layers[2], [layers[3], layers[4]])
    for n, p in layers[2].named_parameters():
        if "norm" in n:
            assert torch.equal(p, before[2][n])  # norms keep layer l's weights
        else:
            expect = before[2][n] + (before[3][n] - before[2][n]) + (before[4][n] - before[2][n])
            assert torch.allclose(p, expect, atol=1e-6), n


def _laco_inputs(model, calib, num_remove, **opts):
    from prunelab.stages.calibration.stats import CalibrationStats
    from prunelab.stages.criteria.base import CriterionInputs
    from prunelab.stages.criteria.settings import LacoSettings

    stats = CalibrationStats(num_blocks=len(model.model.layers))
    return CriterionInputs(model, stats, 0, LacoSettings(**opts), calib, 3, num_remove, progress=False)


def test_laco_reaches_the_target_and_its_plan_reproduces_the_collapsed_model(tiny_model, calib):
    from prunelab.stages.arch.llama import adapter_for
    from prunelab.stages.criteria.laco import laco
    from prunelab.stages.prune import prune_config
    from prunelab.stages.selection.blocks import make_plan

    dense = copy.deepcopy(tiny_model)
    res = laco(_laco_inputs(tiny_model, calib, 3, merge_layers=2, interval=1, threshold=-1.0)).to_json()
    for p, q in zip(dense.parameters(), tiny_model.parameters()):
        assert torch.equal(p, q)  # the criterion did not touch the model
    assert sum(len(m["from"]) for m in res["merges"]) == 3 and all(t["kept"] for t in res["trials"])
    assert res["merges"][0]["into"] == 6 - 1 - 2 + 0  # starts at H − C with H the last layer
    cfg = prune_config({"type": "prune", "criterion": "laco", "num_blocks": 3})
    plan = make_plan(res, cfg, adapter_for(tiny_model))
    assert plan.merges and plan.layers_after == 3
    pruned = apply_plan(copy.deepcopy(tiny_model), plan)
    assert len(pruned.model.layers) == 3
    # the first merge, recomputed by hand, sits in the kept base layer
    first = plan.merges[0]
    base = dense.model.layers[first.into].mlp.down_proj.weight
    expect = base + sum(dense.model.layers[j].mlp.down_proj.weight - base for j in first.from_)
    if all(first.into not in m.from_ and m.into != first.into for m in plan.merges[1:]):
        kept = [i for i in range(6) if i not in plan.removed_blocks]
        assert torch.allclose(pruned.model.layers[kept.index(first.into)].mlp.down_proj.weight, expect, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(pruned(calib).logits).all()


def test_laco_threshold_that_rejects_every_merge_is_a_clear_error(tiny_model, calib):
    from prunelab.stages.criteria.laco import laco

    with pytest.raises(ValueError, match="lower score.settings.laco.threshold"):
        laco(_laco_inputs(tiny_model, calib, 2, merge_layers=2, threshold=0.999999))


def test_laco_recipe_end_to_end(tmp_path):
    import yaml

    from prunelab.run import main

    recipe = yaml.safe_load(Path("recipes/debug.yaml").read_text())
    recipe["name"] = "laco"
    for st in recipe["stages"].values():
        if st["type"] == "score":
            st["criteria"] = ["laco"]
            st["laco"] = {"merge_layers": 2, "threshold": -1.0}
        if st["type"] == "prune":
            st["criterion"] = "laco"
    path = tmp_path / "laco.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main([str(path), "--output-dir", str(tmp_path), "--no-progress"]) == 0
    import json

    plan = json.loads(next((tmp_path / "laco").glob("*-prune/plan.json")).read_text())
    assert plan["merges"] and plan["criterion"] == "laco"
