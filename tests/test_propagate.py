"""``propagate: pruned`` (issue 28 item 3): the width plan of the dense scores, compensation re-fitted block by block on
the outputs of the already-pruned blocks.

What defines it, checked here on the tiny Llama: where nothing was pruned before a layer its compensation is the
dense one; the statistics block 1 is fitted on are those a full calibration pass collects on the model whose block
0 is already pruned and compensated (and, for down_proj, block 1's attention too), with the cross term against the
dense model's inputs; the plan is propagate: dense's plan; and the closed form is the least-squares solution.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from prunelab.stages.arch import adapter_for
from prunelab.stages.calibration.full import collect_stats
from prunelab.stages.calibration.propagate import capture_inputs
from prunelab.stages.calibration.width import summary_tensors
from prunelab.stages.io.tiny import tiny_llama
from prunelab.stages.surgery.apply import add_output_biases, prune_layer_width, replace_weights
from prunelab.stages.surgery.compensation import bias_compensation, optimal_compensation, optimal_layer
from prunelab.stages.surgery.propagated import PairedInputs, asymmetric_bias, asymmetric_layer, propagated_compensation
from prunelab.stages.surgery.targets import BiasCompensation, OptimalCompensation

ROOT = Path(__file__).resolve().parents[1]
NONE = {"q_heads": [], "kv_heads": [], "mlp": []}
# block 0: KV group 0 (query heads 0, 1) and a quarter of the MLP; block 1: KV group 1 and other MLP channels
PLAN = {0: {"q_heads": [0, 1], "kv_heads": [0], "mlp": list(range(0, 128, 4))},
        1: {"q_heads": [2, 3], "kv_heads": [1], "mlp": list(range(1, 128, 3))}}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(num_layers=4, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 259, (6, 32), generator=torch.Generator().manual_seed(0))


def _paired(x: torch.Tensor, xp: torch.Tensor) -> PairedInputs:
    p = PairedInputs()
    p.add(x, xp, gram=True, cross=True)
    return p


def test_same_inputs_give_the_dense_optimal_solution() -> None:
    """X' = X: C = H', and the ridge-regularised least squares is OBS's closed form (with and without the bias)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(200, 12, generator=g), torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    paired, removed = _paired(x, x), [1, 4, 7]
    for with_bias in (True, False):
        want = optimal_layer(w, b, paired.gram, paired.total, paired.count, removed, 0.01, with_bias)
        got = asymmetric_layer(w, b, paired, removed, 0.01, with_bias)
        torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-10)
        if with_bias:
            torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-10)
    flap = w.double()[:, removed] @ x.double().mean(0)[removed]  # FLAP's b + W_S x̄_S
    torch.testing.assert_close(asymmetric_bias(w, paired, removed, "dense"), flap)


def test_the_closed_form_is_the_least_squares_fit_to_the_dense_output() -> None:
    """[W', b'] minimises ‖X'_K W'ᵀ + b' − (X Wᵀ + b)‖² + λ‖[W', b'] − [W_K, b]‖²: equal to a direct solve of the
    stacked system, and no worse on the dense target than fitting the pruned-path inputs to themselves (target self)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64)
    xp = x + 0.3 * torch.randn(300, 10, generator=g, dtype=torch.float64)  # the pruned path drifted
    w, b = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    removed, damping = [2, 5], 0.01
    keep = [j for j in range(10) if j not in removed]
    new_w, new_b = asymmetric_layer(w, b, _paired(x, xp), removed, damping)
    a = torch.cat([xp[:, keep], torch.ones(300, 1, dtype=torch.float64)], 1)
    aug = torch.cat([xp, torch.ones(300, 1, dtype=torch.float64)], 1)
    lam = damping * torch.diagonal(aug.T @ aug).mean()
    target = x @ w.T + b
    prior = torch.cat([w[:, keep], b[:, None]], 1)
    ridge = lam * torch.eye(len(keep) + 1, dtype=torch.float64)
    direct = torch.linalg.solve(a.T @ a + ridge, a.T @ target + lam * prior.T).T
    torch.testing.assert_close(torch.cat([new_w, new_b[:, None]], 1), direct, rtol=1e-9, atol=1e-10)
    own = _paired(xp, xp)
    self_w, self_b = optimal_layer(w, b, own.gram, own.total, own.count, removed, damping)

    def err(ww: torch.Tensor, bb: torch.Tensor) -> float:
        return float(((xp[:, keep] @ ww.T + bb - target) ** 2).sum())

    assert err(new_w, new_b) < err(self_w, self_b)


@pytest.mark.parametrize("plan", [{0: {"q_heads": [0, 1], "kv_heads": [0], "mlp": []}},
                                  {3: {"q_heads": [], "kv_heads": [], "mlp": list(range(0, 128, 5))}}])
def test_nothing_pruned_before_gives_the_dense_compensation(model: torch.nn.Module, calib: torch.Tensor,
                                                            plan: dict) -> None:
    """A layer whose inputs nothing pruned has touched (block 0's o_proj; the last block's down_proj when only its MLP
    loses channels) gets exactly propagate: dense's compensation."""
    stats = summary_tensors(collect_stats(model, calib, {"hessian"}, 2, False))
    want = optimal_compensation(model, plan, stats["gram"], 0.01, True)
    got = propagated_compensation(model, calib, plan, OptimalCompensation(), batch_size=2, progress=False)
    assert got.keys() == want.keys() and want
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    want_bias = bias_compensation(model, plan, stats)
    got_bias = propagated_compensation(model, calib, plan, BiasCompensation(), batch_size=2, progress=False)
    for k in want_bias:
        torch.testing.assert_close(got_bias[k], want_bias[k], rtol=1e-5, atol=1e-6)
    assert propagated_compensation(model, calib, {}, OptimalCompensation(), batch_size=2, progress=False) == {}


def _prune(model: torch.nn.Module, block: int, units: dict, side: dict) -> None:
    """Surgery's primitives on one block: slice its units, install the side tensors named for it."""
    ad = adapter_for(model)
    prune_layer_width(ad.layers[block], units, type(ad))
    mine = {k: v for k, v in side.items() if k.startswith(f"{ad.BLOCKS}.{block}.")
            and (k.split(".")[-2] == ("o_proj" if units["kv_heads"] else "down_proj"))}
    replace_weights(model, {k: v for k, v in mine.items() if k.endswith("weight")})
    add_output_biases(model, {k: v for k, v in mine.items() if k.endswith("bias")})


def _cross(dense: torch.nn.Module, pruned: torch.nn.Module, calib: torch.Tensor, block: int, role: str) -> torch.Tensor:
    """X'ᵀX of ``role``'s inputs in ``block``: the pruned model's against the dense model's, token by token."""
    out = torch.zeros(0)
    for ids in calib.split(2):
        seen = []
        for m in (dense, pruned):
            got, handle = capture_inputs(adapter_for(m).linear(adapter_for(m).layers[block], role))
            with torch.no_grad():
                adapter_for(m).final_states(ids)
            handle.remove()
            seen.append(got[0].reshape(-1, got[0].shape[-1]).double())
        out = seen[1].T @ seen[0] + (out if out.numel() else 0)
    return out


def test_block_1_is_fitted_on_the_model_whose_block_0_is_already_pruned(model: torch.nn.Module,
                                                                        calib: torch.Tensor) -> None:
    """The definition of pruned propagation: block 1's statistics equal a full pass over the model with block 0 (and,
    for down_proj, block 1's attention) already pruned and compensated with the walk's own side tensors."""
    record: dict = {}
    side = propagated_compensation(model, calib, PLAN, OptimalCompensation(), batch_size=2, progress=False,
                                   record=record)
    dense_stats = collect_stats(model, calib, {"hessian"}, 2, False)
    pruned = copy.deepcopy(model)
    _prune(pruned, 0, {**PLAN[0], "mlp": []}, side)
    _prune(pruned, 0, {**NONE, "mlp": PLAN[0]["mlp"]}, side)
    for role, slot in (("o", "o_proj"), ("down", "down_proj")):
        if role == "down":  # block 1's attention is pruned before its down_proj is fitted
            _prune(pruned, 1, {**PLAN[1], "mlp": []}, side)
        full = collect_stats(pruned, calib, {"hessian"}, 2, False).inputs[slot][1]
        mine = record[(1, role)]
        assert mine.count == full.count
        torch.testing.assert_close(mine.gram, full.gram, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine.total, full.total, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine.dense_total, dense_stats.inputs[slot][1].total, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine.cross, _cross(model, pruned, calib, 1, role), rtol=1e-6, atol=1e-7)
        assert not torch.allclose(mine.gram, dense_stats.inputs[slot][1].gram)  # the paths really differ


def test_the_fit_is_closer_to_the_dense_model_on_calibration_data(model: torch.nn.Module, calib: torch.Tensor) -> None:
    """Fitting each layer to the dense output repairs carried-in error: the pruned model's last hidden state on the
    calibration windows is nearer the dense one than with propagate: dense's compensation (measured on this tiny
    model: about 3× less squared error; the bar asks only for less)."""
    stats = summary_tensors(collect_stats(model, calib, {"hessian"}, 2, False))
    errors = []
    for side in (optimal_compensation(model, PLAN, stats["gram"], 0.01, True),
                 propagated_compensation(model, calib, PLAN, OptimalCompensation(), batch_size=2, progress=False)):
        pruned = copy.deepcopy(model)
        for i, units in PLAN.items():
            _prune(pruned, i, {**units, "mlp": []}, side)
            _prune(pruned, i, {**NONE, "mlp": units["mlp"]}, side)
        with torch.no_grad():
            errors.append(float((adapter_for(pruned).final_states(calib) - adapter_for(model).final_states(calib))
                                .pow(2).sum()))
    assert errors[1] < errors[0]


def _recipe(tmp_path: Path, pipeline: dict, prune: dict | None = None) -> Path:
    raw = yaml.safe_load((ROOT / "recipes" / "debug-sequential.yaml").read_text())
    raw["stages"]["calibrate"]["pipeline"] = pipeline
    raw["stages"]["calibrate"]["source"]["path"] = str(ROOT / "tests/data/tiny_corpus.txt")
    raw["stages"]["eval_pruned"]["perplexity"]["tiny"]["source"]["path"] = str(ROOT / "tests/data/tiny_corpus.txt")
    raw["stages"].pop("score_depth")
    if prune:
        raw["stages"]["prune_width"].update(prune)
    path = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_recipe_keeps_the_dense_plan_and_resumes(tmp_path: Path) -> None:
    """Through the stages: the same plan.json layers as propagate: dense (global allocation from pass 1), other
    compensation tensors, and a resumed run rebuilds the same model from plan + side file."""
    from safetensors.torch import load_file

    from prunelab.run import main

    runs = {}
    for propagate in ("dense", "pruned"):
        out = tmp_path / propagate
        assert main([str(_recipe(tmp_path, {"type": "sequential", "propagate": propagate})), "--output-dir", str(out),
                     "--no-progress"]) == 0
        runs[propagate] = next(out.iterdir())
    plans = {k: json.loads(next(d.glob("*-prune_width/plan.json")).read_text()) for k, d in runs.items()}
    assert plans["dense"]["layers"] == plans["pruned"]["layers"] and plans["pruned"]["layers"]
    assert plans["pruned"]["target"]["compensation"]["type"] == "optimal"
    sides = {k: load_file(str(next(d.glob("*-prune_width/compensation.safetensors")))) for k, d in runs.items()}
    assert sides["dense"].keys() == sides["pruned"].keys()
    assert any(not torch.equal(sides["dense"][k], sides["pruned"][k]) for k in sides["dense"])
    metrics = json.loads((runs["pruned"] / "metrics.json").read_text())
    recipe = runs["pruned"] / "recipe.resolved.yaml"
    assert main([str(recipe), "--output-dir", str(tmp_path / "pruned"), "--resume", "--no-progress"]) == 0
    assert json.loads((runs["pruned"] / "metrics.json").read_text())["eval"] == metrics["eval"]


@pytest.mark.parametrize(("prune", "message"), [
    ({"compensation": "none"}, "compensation: none re-fits nothing"),
    ({"units": "blocks", "ratio": 0.2, "allocation": None, "compensation": None, "criterion": "block_influence"},
     "block removal fits nothing"),
])
def test_what_it_cannot_serve_is_refused_at_dry_run(tmp_path: Path, prune: dict, message: str, capsys) -> None:
    from prunelab.run import main

    raw = yaml.safe_load(_recipe(tmp_path, {"type": "sequential", "propagate": "pruned"}, {}).read_text())
    stage = raw["stages"]["prune_width"]
    for k, v in prune.items():
        if v is None:
            stage.pop(k, None)
        else:
            stage[k] = v
    if stage["units"] == "blocks":
        raw["stages"]["score_width"] = {"type": "score", "criteria": ["block_influence"]}
        stage.pop("attention", None)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main([str(path), "--dry-run", "--output-dir", str(tmp_path / "o")]) != 0
    text = capsys.readouterr()
    assert message in text.out + text.err and "propagate: dense" in text.out + text.err


def test_target_without_pruned_propagation_names_the_field() -> None:
    from pydantic import ValidationError

    from prunelab.stages.calibration.pipelines import SequentialPipeline

    with pytest.raises(ValidationError, match="target: self .* needs propagate: pruned"):
        SequentialPipeline(target="self")
    assert "target" not in SequentialPipeline(propagate="pruned").model_dump()  # default left out of dumps
