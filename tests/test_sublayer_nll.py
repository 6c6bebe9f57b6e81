"""Removal-cost sublayer criteria (stages.criteria.sublayer_nll): the cached-prefix NLL equals a full forward of the
model with the sublayer removed, the greedy takes the sublayer whose removal costs least, the exact greedy equals a
brute-force SLEB over deep copies, the parameter target is met, and a recipe runs end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.io.tiny import tiny_family, tiny_llama

FAMILIES = ("llama", "qwen2", "granite", "olmo2")
# float64 models, but the head's logits are cast to float32 in ArchAdapter.nll_per_sequence: measured gap ≤ 3e-8
# relative; removing a different sublayer moves the NLL by > 1e-3 relative on these models.
REL = 1e-6


def _prune(**kw):
    from prunelab.stages.prune import prune_config

    return prune_config({"type": "prune", "units": "sublayers", "criterion": "sublayer_sleb", **kw})


def _inputs(model, calib, prune=None, settings=None, batch_size=2):
    from prunelab.stages.calibration.stats import CalibrationStats
    from prunelab.stages.criteria.base import CriterionInputs

    stats = CalibrationStats(num_blocks=adapter_for(model).num_blocks)
    return CriterionInputs(model=model, stats=stats, settings=settings, calibration=calib, batch_size=batch_size,
                           progress=False, prune=prune)


def _full_nll(model, calib: torch.Tensor, attention=(), mlp=()) -> float:
    """Summed next-token NLL of a deep copy with those sublayers really removed (the model's own forward)."""
    from prunelab.stages.surgery.sublayers import remove_sublayers

    m = copy.deepcopy(model)
    remove_sublayers(m, list(attention), list(mlp))
    with torch.inference_mode():  # logits in the model's dtype (transformers' loss would upcast only to float32)
        return sum(torch.nn.functional.cross_entropy(m(input_ids=ids[None], use_cache=False).logits[0, :-1], ids[1:],
                                                     reduction="sum").item() for ids in calib)


def _dampen(model, which: str, layer: int, scale: float = 1e-3) -> None:
    """Scale one sublayer's output projection so removing it costs almost nothing."""
    ad = adapter_for(model)
    with torch.no_grad():
        ad.linear(ad.layers[layer], "o" if which == "attention" else "down").weight.mul_(scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefix_nll_equals_a_full_forward_with_the_sublayer_removed(family: str, calib: torch.Tensor) -> None:
    """float64: the walk's ΔNLL + its base NLL is the NLL of the model with that sublayer removed, for every sublayer
    (early ones re-run the whole tail, the last MLP only the head), and after a removal for the pruned model."""
    from prunelab.stages.criteria.sublayer_nll import SublayerWalk, sublayer_sequence

    model = (tiny_llama(num_layers=3) if family == "llama" else tiny_family(family, num_layers=3)).double().eval()
    ad = adapter_for(model)
    walk = SublayerWalk(ad, calib, 2, sublayer_sequence(ad))
    tokens = walk.tokens(list(range(len(walk.ids))))
    assert walk.nll() * tokens == pytest.approx(_full_nll(model, calib), rel=REL)
    for q, (which, i) in enumerate(walk.kept):
        removed = walk.removal_delta(q, list(range(len(walk.ids))))[0] * tokens + sum(walk.base)
        want = _full_nll(model, calib, *([[i], []] if which == "attention" else [[], [i]]))
        assert removed == pytest.approx(want, rel=REL), (which, i)
    walk.remove(walk.kept.index(("attention", 1)))  # states after it refreshed: the next removal is on the pruned model
    q = walk.kept.index(("mlp", 0))
    removed = walk.removal_delta(q, list(range(len(walk.ids))))[0] * tokens + sum(walk.base)
    assert removed == pytest.approx(_full_nll(model, calib, [1], [0]), rel=REL)
    assert walk.nll() * tokens == pytest.approx(_full_nll(model, calib, [1], []), rel=REL)


@pytest.mark.parametrize("objective", ["per_param", "absolute"])
def test_the_sublayer_that_costs_least_goes_first(objective: str, calib: torch.Tensor) -> None:
    """Against the definition: ΔNLL of every sublayer by a full forward of a deep copy without it (a random model's
    costs are small and some negative, so one MLP is first made nearly free: ΔNLL ≈ 0 is not automatically least)."""
    from prunelab.stages.criteria.sublayer import SublayerPPLSettings, SublayerSLEBSettings
    from prunelab.stages.criteria.sublayer_nll import sublayer_ppl, sublayer_sleb
    from prunelab.stages.selection.sublayers import sublayer_params

    model = tiny_llama(num_layers=5).double()
    _dampen(model, "mlp", 1)
    params = sublayer_params(adapter_for(model))
    base = _full_nll(model, calib)
    cost = {u: (_full_nll(model, calib, *([[u[1]], []] if u[0] == "attention" else [[], [u[1]]])) - base)
            / (params[u] if objective == "per_param" else 1) for u in params}
    want = min(cost, key=lambda u: (cost[u], u[0] != "attention", u[1]))
    ppl = sublayer_ppl(_inputs(model, calib, settings=SublayerPPLSettings(objective=objective))).to_json()
    scores = {(k, i): ppl[k][i] for k in ("attention", "mlp") for i in range(5)}
    assert min(scores, key=scores.get) == want
    assert sorted(scores, key=scores.get) == sorted(cost, key=cost.get)  # the whole one-shot ranking
    out = sublayer_sleb(_inputs(model, calib, _prune(sublayers="both", num_sublayers=1),
                                SublayerSLEBSettings(objective=objective))).to_json()
    assert out["sublayer_order"] == [f"{want[0]}.{want[1]}"]


def _brute_force_sleb(model, calib, kinds, count, params) -> list[str]:
    """SLEB Alg. 1 by definition: every round, a full forward of a deep copy per candidate; ΔNLL per parameter."""
    removed: list[tuple[str, int]] = []
    n = adapter_for(model).num_blocks
    for _ in range(count):
        def nll(extra, removed=removed):
            units = [*removed, extra] if extra else removed
            return _full_nll(model, calib, [i for k, i in units if k == "attention"], [i for k, i in units if k == "mlp"])

        base = nll(None)
        left = {k: n - sum(1 for kk, _ in removed if kk == k) for k in kinds}
        cands = [(k, i) for i in range(n) for k in ("attention", "mlp")
                 if k in kinds and (k, i) not in removed and left[k] > 1]
        removed.append(min(cands, key=lambda u: ((nll(u) - base) / params[u], u[0] != "attention", u[1])))
    return [f"{k}.{i}" for k, i in removed]


def test_the_exact_greedy_is_sleb_over_sublayers_and_lazy_agrees(calib: torch.Tensor) -> None:
    from prunelab.stages.criteria.sublayer import SublayerSLEBSettings
    from prunelab.stages.criteria.sublayer_nll import sublayer_sleb
    from prunelab.stages.selection.sublayers import sublayer_params

    model = tiny_llama(num_layers=4).double()
    want = _brute_force_sleb(model, calib, ("attention", "mlp"), 4, sublayer_params(adapter_for(model)))
    prune = _prune(sublayers="both", num_sublayers=4)
    exact = sublayer_sleb(_inputs(model, calib, prune, SublayerSLEBSettings(lazy=False, screen=1.0))).to_json()
    assert exact["sublayer_order"] == want
    assert all(r["fresh"] == r["candidates"] for r in exact["rounds"])
    # lazy and screened: fewer re-scores, the same first choice; later rounds may differ on a random model, where
    # removal costs need not grow as sublayers go (the assumption that makes stale values lower bounds)
    lazy = sublayer_sleb(_inputs(model, calib, prune, SublayerSLEBSettings(min_fresh=1))).to_json()
    assert lazy["sublayer_order"][0] == want[0]
    assert sum(r["fresh"] for r in lazy["rounds"]) < sum(r["fresh"] for r in exact["rounds"])


def test_the_parameter_target_is_met_and_the_plan_follows_the_greedy(calib: torch.Tensor) -> None:
    from prunelab.stages.criteria.sublayer_nll import sublayer_sleb
    from prunelab.stages.selection.sublayers import make_sublayer_plan, sublayer_params
    from prunelab.stages.selection.targets import ratio_to_params

    model = tiny_llama(num_layers=6)
    ad = adapter_for(model)
    params = sublayer_params(ad)
    for kinds, ratio in (("both", 0.25), ("attention", 0.1), ("mlp", 0.2)):
        prune = _prune(sublayers=kinds, ratio=ratio)
        out = sublayer_sleb(_inputs(model, calib, prune)).to_json()
        order = [(u.split(".")[0], int(u.split(".")[1])) for u in out["sublayer_order"]]
        budget = ratio_to_params(ratio, ad.total_params())
        removed = sum(params[u] for u in order)
        assert removed >= budget > removed - params[order[-1]]  # stops at the first step that reaches the budget
        assert kinds == "both" or {k for k, _ in order} == {kinds}
        plan = make_sublayer_plan(out, prune, ad)
        chosen = {("attention", i) for i in plan.removed_attention} | {("mlp", i) for i in plan.removed_mlp}
        assert chosen in (set(order), set(order[:-1]))  # the greedy's prefix nearest the budget
        assert abs(plan.params_before - plan.params_after - budget) <= abs(removed - budget)


def test_sleb_needs_a_sublayer_target(calib: torch.Tensor) -> None:
    from prunelab.stages.criteria.sublayer_nll import sublayer_sleb

    with pytest.raises(ValueError, match="units: sublayers"):
        sublayer_sleb(_inputs(tiny_llama(num_layers=3), calib))


def test_settings_are_checked_by_name() -> None:
    from pydantic import ValidationError

    from prunelab.stages.score import ScoreConfig

    with pytest.raises(ValidationError, match="sublayer_sleb.screen"):
        ScoreConfig.model_validate({"type": "score", "criteria": ["sublayer_sleb"], "settings": {"sublayer_sleb": {"screen": 0}}})
    with pytest.raises(ValidationError, match="did you mean 'objective'"):
        ScoreConfig.model_validate({"type": "score", "criteria": ["sublayer_ppl"], "settings": {"sublayer_ppl": {"objectve": 1}}})


def test_recipe_end_to_end(tmp_path) -> None:
    """debug-sublayer with the greedy: the score stage hands the prune stage's target to the criterion."""
    from prunelab.run import main

    args = ["recipes/debug-sublayer.yaml", "--output-dir", str(tmp_path), "--no-progress",
            "stages.score.criteria=[sublayer_sleb]", "stages.prune.criterion=sublayer_sleb"]
    assert main(args) == 0
    run = tmp_path / "debug-sublayer"
    plan = json.loads(next(run.glob("*-prune/plan.json")).read_text())
    scores = json.loads(next(run.glob("*-score/scores.json")).read_text())["sublayer_sleb"]
    assert plan["num_removed"] == 3 == len(scores["sublayer_order"])
    got = [f"attention.{i}" for i in plan["removed_attention"]] + [f"mlp.{i}" for i in plan["removed_mlp"]]
    assert sorted(got) == sorted(scores["sublayer_order"])


def test_other_layouts_are_refused_by_name(calib: torch.Tensor) -> None:
    from prunelab.stages.criteria.sublayer_nll import sublayer_ppl

    with pytest.raises(ValueError, match="sublayer removal needs"):
        sublayer_ppl(_inputs(tiny_family("gemma2", num_layers=2), calib))
