"""Hidden-channel pruning (LLM-Pruner's "channel" mode): masking == removal, reload, criteria, bad input, CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from prunelab.recipe import RecipeError, validate
from prunelab.stages.calibration.full import collect_stats
from prunelab.stages.calibration.width import geometry
from prunelab.stages.criteria.base import CriterionInputs
from prunelab.stages.criteria.hidden import hidden_channel_scores, hidden_members, params_per_hidden_channel
from prunelab.stages.selection.width import summarize
from prunelab.stages.surgery.apply import PlanError, apply_plan
from prunelab.stages.surgery.plan import HiddenPlan


def _mask_hidden(model, channels: list[int]) -> None:
    """Zero every weight a hidden channel owns: the channel then stays 0 in the residual stream."""
    with torch.no_grad():
        for _, t, axis in hidden_members(model):
            if axis == 1:
                t[:, channels] = 0
            else:
                t[channels] = 0


def _hidden_plan(model, removed: list[int], rescale: bool = True) -> HiddenPlan:
    geos = [geometry(layer) for layer in model.model.layers]
    d = model.config.hidden_size
    return HiddenPlan(shapes_before=summarize({}, geos), shapes_after=summarize({}, geos),
                      hidden={"removed": removed, "hidden_before": d, "hidden_after": d - len(removed), "norm_rescale": rescale})


def _perturb_norms(model) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("model_type,tie", [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", False)])
def test_hidden_masking_equals_removal_and_reloads_vanilla(model_type, tie, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunelab.stages.io.tiny import tiny_llama

    model = tiny_llama(num_layers=3, model_type=model_type, tie=tie)
    _perturb_norms(model)
    if model_type == "qwen2":  # q/k/v biases are output-indexed: hidden removal leaves them whole
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
    removed = [0, 5, 17, 22, 31, 40, 50, 63]
    masked = copy.deepcopy(model)
    _mask_hidden(masked, removed)
    head_dim = model.model.layers[0].self_attn.head_dim
    apply_plan(model, _hidden_plan(model, removed))
    assert model.config.hidden_size == 56 and model.model.embed_tokens.weight.shape == (259, 56)
    assert model.config.head_dim == head_dim == model.model.layers[0].self_attn.head_dim  # never changes
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie  # tied stays tied
    with torch.no_grad():
        out = model(calib).logits
        assert (masked(calib).logits - out).abs().max().item() <= 1e-5
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert (fresh(calib).logits - out).abs().max().item() <= 1e-5
    with torch.no_grad():  # the KV cache still works at the new width
        a = model.generate(calib[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=2)
        b = model.generate(calib[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(a, b)


def test_without_norm_rescale_it_is_llm_pruners_plain_slice(tiny_model, calib):
    """Plain slicing (LLM-Pruner) keeps norm weights as they were and differs from masking: RMSNorm divides by d'."""
    _perturb_norms(tiny_model)
    masked = copy.deepcopy(tiny_model)
    before = tiny_model.model.norm.weight.detach().clone()
    _mask_hidden(masked, [1, 2, 3, 4, 5, 6, 7, 8])
    apply_plan(tiny_model, _hidden_plan(tiny_model, [1, 2, 3, 4, 5, 6, 7, 8], rescale=False))
    assert torch.equal(tiny_model.model.norm.weight, before[[0, *range(9, 64)]])
    with torch.no_grad():
        assert (masked(calib).logits - tiny_model(calib).logits).abs().max().item() > 1e-3


def test_hidden_group_owns_the_parameters_it_saves(tiny_untied):
    per = params_per_hidden_channel(tiny_untied)
    before = sum(p.numel() for p in tiny_untied.parameters())
    apply_plan(tiny_untied, _hidden_plan(tiny_untied, [3, 4, 5, 9, 10, 11]))
    assert before - sum(p.numel() for p in tiny_untied.parameters()) == 6 * per


def test_bad_hidden_plans_are_refused(tiny_model):
    with pytest.raises(PlanError, match="fewer than"):
        apply_plan(tiny_model, _hidden_plan(tiny_model, list(range(64))))
    plan = _hidden_plan(tiny_model, [1])
    plan.hidden.hidden_before = 128
    with pytest.raises(PlanError, match="hidden_size 128"):
        apply_plan(tiny_model, plan)


def test_hidden_taylor_is_abs_weight_times_gradient_over_every_member(tiny_untied, calib):
    """LLM-Pruner Eq. 4 summed over the channel's group: embedding column, head column, norms, q/k/v/gate/up columns,
    o/down rows — computed here by hand from autograd for one channel."""
    stats = collect_stats(tiny_untied, calib, {"grad", "hidden"}, progress=False)
    scores = hidden_channel_scores(CriterionInputs(tiny_untied, stats), "taylor")
    c = 7
    expected = 0.0
    tiny_untied.zero_grad()
    grads: dict[str, torch.Tensor] = {}
    for b in range(calib.shape[0]):
        tiny_untied(input_ids=calib[b : b + 1], labels=calib[b : b + 1]).loss.backward()
        for n, p in tiny_untied.named_parameters():
            grads[n] = grads.get(n, 0) + p.grad.detach() / calib.shape[0]
        tiny_untied.zero_grad()
    for n, p in tiny_untied.named_parameters():
        w, g = p.detach(), grads[n]
        if n in ("model.embed_tokens.weight", "lm_head.weight") or any(k in n for k in ("q_proj.w", "k_proj.w", "v_proj.w", "gate_proj.w", "up_proj.w")):
            expected += (w[:, c] * g[:, c]).abs().sum().item()
        elif "norm" in n or "o_proj.w" in n or "down_proj.w" in n:
            expected += (w[c] * g[c]).abs().sum().item()
    assert scores[c] == pytest.approx(expected, rel=1e-4)
    assert len(scores) == 96


def test_every_hidden_criterion_scores_every_channel(tiny_model, calib):
    from prunelab.stages.criteria import HIDDEN_CRITERIA

    stats = collect_stats(tiny_model, calib, {"grad", "fisher", "hidden"}, progress=False)
    for name in HIDDEN_CRITERIA:
        s = hidden_channel_scores(CriterionInputs(tiny_model, stats), name)
        assert len(s) == 64 and all(math.isfinite(v) for v in s), name
    with pytest.raises(ValueError, match="no hidden-channel score|does not score hidden"):
        hidden_channel_scores(CriterionInputs(tiny_model, stats), "flap")


BASE = {
    "name": "h", "model": {"source": "tiny-random-llama"},
    "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 2, "seq_len": 16},
        "score": {"type": "score", "units": "width"},
        "prune": {"type": "prune", "units": "hidden", "criterion": "taylor", "ratio": 0.2},
    },
}


@pytest.mark.parametrize("change,expected", [
    ({"criterion": "flap"}, "has no hidden-channel score"),
    ({"mlp": True}, "hidden channels are pruned on their own (LLM-Pruner's channel mode): attention and mlp do not apply"),
    ({"compensation": "bias"}, "compensation do not apply"),
    ({"layers": [1, 3]}, "compensation do not apply"),
], ids=["flap", "mlp too", "compensation", "layer range"])
def test_bad_hidden_recipes(change, expected):
    raw = copy.deepcopy(BASE)
    raw["stages"]["prune"].update(change)
    with pytest.raises(RecipeError) as exc:
        validate(raw)
    assert expected in str(exc.value)


def test_hidden_recipe_through_the_cli_reaches_the_target_and_reloads(tmp_path):
    import json

    import yaml
    from transformers import AutoModelForCausalLM

    from prunelab.run import main

    raw = copy.deepcopy(BASE)
    raw["stages"]["export"] = {"type": "export"}
    path = tmp_path / "h.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main([str(path), "--output-dir", str(tmp_path), "--no-progress"]) == 0
    run = tmp_path / "h"
    plan = json.loads(next(run.glob("*-prune/plan.json")).read_text())
    assert plan["hidden"]["hidden_after"] < plan["hidden"]["hidden_before"] == 64
    assert abs(plan["achieved_ratio"] - 0.2) < 0.02
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.hidden_size == plan["hidden"]["hidden_after"]


def test_hidden_group_matches_torch_pruning_dependency_graph(tiny_untied):
    """torch-pruning resolves the hidden-channel group from embed_tokens in milliseconds (unlike k_proj groups):
    its members must be exactly ours — embedding, head, every norm, q/k/v/gate/up inputs, o/down outputs."""
    tp = pytest.importorskip("torch_pruning")
    import warnings

    ids = torch.randint(3, 200, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters": the RMSNorm weights, which it prunes on their last dim
        graph = tp.DependencyGraph().build_dependency(tiny_untied, example_inputs={"input_ids": ids},
                                                      output_transform=lambda out: out.logits)
    group = graph.get_pruning_group(tiny_untied.model.embed_tokens, tp.prune_embedding_out_channels, idxs=[2, 5])
    modules = {m: n for n, m in tiny_untied.named_modules()}
    params = {p: n for n, p in tiny_untied.named_parameters()}
    found = set()
    for dep, idxs in group:
        target = dep.target.module
        if isinstance(target, torch.nn.Linear):
            found.add((modules[target] + ".weight", 1 if dep.handler == tp.prune_linear_in_channels else 0))
        elif isinstance(target, torch.nn.Embedding):
            found.add((modules[target] + ".weight", 1))
        elif isinstance(target, torch.nn.Parameter):
            found.add((params[target], 0))
        else:
            continue
        assert sorted(idxs) == [2, 5]
    assert found == {(name, axis) for name, _, axis in hidden_members(tiny_untied)}
