"""Mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE; ``stages/arch/moe.py``) on tiny random models built
offline from their transformers config classes: block removal, the expert and expert-channel units — removal equals
masking (an expert: its router logit −∞ before the top-k; a channel: zeroed), vanilla ``from_pretrained`` reload equal,
KV-cache ``generate`` equal to uncached — Qwen2-MoE's shared expert (a dense MLP: the ``mlp_channel`` unit), the expert
criteria (REAP, frequency × norm, magnitude, random, Wanda-sp, FLAP), the typed settings and their refusals, and each
family's debug recipe through the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from exactness import assert_lora_step_merges_and_reloads, assert_masked_and_reload_equal

MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]
# per family: (each expert's width, the dense MLP width — Qwen2-MoE's shared expert; 0: no dense MLP)
WIDTHS = {"mixtral": (128, 0), "qwen3_moe": (32, 0), "qwen2_moe": (32, 48)}


def _model(family: str, layers: int = 3, **extra):
    from prunelab.stages.io.tiny import tiny_family

    return tiny_family(family, num_layers=layers, **extra)


def _adapter(model):
    from prunelab.stages.arch import adapter_for

    return adapter_for(model)


def _plan(model, layers: dict[int, dict]):
    from prunelab.stages.selection.width import summarize
    from prunelab.stages.surgery.plan import WidthPlan

    geos = _adapter(model).geometries()
    empty = {"q_heads": [], "kv_heads": [], "mlp": []}
    full = {i: {**empty, **layers.get(i, {})} for i in range(len(geos))}
    return WidthPlan(
        layers={str(i): {**empty, **r} for i, r in layers.items()},
        shapes_before=summarize({}, geos),
        shapes_after=summarize(full, geos),
    )


def _mask_router(model, removed: dict[int, list[int]]) -> None:
    """Removal's masking twin for experts: the removed experts' router logits are −∞ before softmax and top-k."""
    ad = _adapter(model)
    for i, experts in removed.items():
        router = ad.router(ad.layers[i])

        def forward(hidden, router=router, experts=experts):
            logits = torch.nn.functional.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            logits[:, experts] = float("-inf")
            top, idx = logits.float().softmax(-1).topk(router.top_k, dim=-1)
            if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        router.forward = forward


def _mask_shared(model, layer: int, channels: list[int]) -> None:
    """Zero shared-expert channels as the adapter's ``mlp_channel`` members say: gate/up rows, down columns."""
    ad = _adapter(model)
    geo = ad.geometry(ad.layers[layer])
    with torch.no_grad():
        for m in ad.members("mlp_channel"):
            weight = ad.layers[layer].get_submodule(m.path).weight
            if m.axis == "out":
                weight[m.index(channels, geo)] = 0
            else:
                weight[:, m.index(channels, geo)] = 0


def _mask_channels(model, layer: int, channels: list[list[int]]) -> None:
    """Zero channel c of expert e: rows c and I + c of its gate_up slice, column c of its down slice."""
    ad = _adapter(model)
    gate_up, down = ad.expert_weights(ad.layers[layer])
    inter = down.shape[2]
    with torch.no_grad():
        for e, cs in enumerate(channels):
            gate_up[e, cs] = 0
            gate_up[e, [inter + c for c in cs]] = 0
            down[e][:, cs] = 0


# ----------------------------------------------------------------------------- adapters and depth
@pytest.mark.parametrize("family", MOE)
def test_moe_adapter_is_registered_and_reads_the_expert_geometry(family: str) -> None:
    from prunelab.stages.arch import MOE_FAMILIES, supported_model_types

    model = _model(family)
    ad = _adapter(model)
    assert family in supported_model_types() and family in MOE_FAMILIES
    assert {"expert", "expert_channel", "block", "kv_group"} <= set(ad.UNIT_KINDS)
    g = ad.geometry(ad.layers[0])
    assert (g.experts, g.top_k, g.expert_intermediate, g.intermediate) == (4, 2, *WIDTHS[family])
    # LoRA: the attention projections, and the shared expert's where there is one (never the fused experts)
    dense = ["gate_proj", "down_proj"] if g.intermediate else []
    assert ad.lora_modules(["q_proj", "gate_proj", "down_proj", "o_proj"]) == ["q_proj", *dense, "o_proj"]


@pytest.mark.parametrize("family", MOE)
def test_block_removal_equals_masking_and_reloads_vanilla(family: str, calib, tmp_path: Path) -> None:
    """A block whose attention output and every expert's (and the shared expert's) down projection are zero adds
    nothing: removing it is exact."""
    from prunelab.stages.surgery.apply import apply_plan

    model = _model(family)
    masked = copy.deepcopy(model)
    ad = _adapter(masked)
    with torch.no_grad():
        ad.linear(ad.layers[1], "o").weight.zero_()
        ad.expert_weights(ad.layers[1])[1].zero_()
        if "down" in ad.roles():  # Qwen2-MoE: the shared expert
            ad.linear(ad.layers[1], "down").weight.zero_()
    apply_plan(model, {"kind": "depth", "removed_blocks": [1], "layers_before": 3})
    assert model.config.num_hidden_layers == 2
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)


def test_block_removal_renumbers_qwen3_moe_dense_mlp_layers(calib, tmp_path: Path) -> None:
    """Qwen3-MoE builds a plain MLP in the layers ``mlp_only_layers`` names: after removing a block before one, the
    list follows it (else the vanilla reload would build experts where the dense MLP was, and fail or differ)."""
    from prunelab.stages.surgery.apply import apply_plan

    model = _model("qwen3_moe", layers=4, mlp_only_layers=[2])
    ad = _adapter(model)
    assert [ad.is_moe(layer) for layer in ad.layers] == [True, True, False, True]
    masked = copy.deepcopy(model)
    mad = _adapter(masked)
    with torch.no_grad():
        mad.linear(mad.layers[1], "o").weight.zero_()
        mad.expert_weights(mad.layers[1])[1].zero_()
    apply_plan(model, {"kind": "depth", "removed_blocks": [1], "layers_before": 4})
    assert model.config.mlp_only_layers == [1] and model.config.decoder_sparse_step == 1
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)


# ----------------------------------------------------------------------------- expert units: masked == removed
@pytest.mark.parametrize("family", MOE)
def test_expert_removal_equals_router_masking_and_reloads_vanilla(family: str, calib, tmp_path: Path) -> None:
    from prunelab.stages.surgery.apply import apply_plan

    model = _model(family)
    removed = {0: [1], 1: [3], 2: [0]}  # other experts per layer, the same count (the config holds one)
    masked = copy.deepcopy(model)
    _mask_router(masked, removed)
    apply_plan(model, _plan(model, {i: {"experts": e} for i, e in removed.items()}))
    ad = _adapter(model)
    assert [g.experts for g in ad.geometries()] == [3, 3, 3]
    assert ad.EXPERT_CONFIG and getattr(model.config, ad.EXPERT_CONFIG[0]) == 3
    assert model.config.num_experts_per_tok == 2
    assert not hasattr(model.config, "prunelab_layer_shapes")
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)


@pytest.mark.parametrize("family", MOE)
def test_expert_channel_removal_equals_masking_and_reloads_vanilla(
    family: str, calib, tmp_path: Path
) -> None:
    from prunelab.stages.surgery.apply import apply_plan

    model = _model(family)
    inter = _adapter(model).geometry(_adapter(model).layers[0]).expert_intermediate
    # other channels in every expert, the same count (8: the kept width stays a multiple of 8, as grouped_mm needs)
    channels = [sorted({e, 5 + e, inter - 1 - e, *range(9 + e, 14 + e)}) for e in range(4)]
    masked = copy.deepcopy(model)
    for i in range(3):
        _mask_channels(masked, i, channels)
    apply_plan(model, _plan(model, {i: {"expert_channels": channels} for i in range(3)}))
    ad = _adapter(model)
    assert {g.expert_intermediate for g in ad.geometries()} == {inter - 8}
    assert getattr(model.config, ad.EXPERT_CONFIG[1]) == inter - 8
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)


@pytest.mark.parametrize("family", MOE)
def test_experts_channels_and_kv_groups_together_reload_and_generate_with_cache(
    family: str, calib, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from prunelab.stages.surgery.apply import apply_plan

    model = _model(family)
    channels = [list(range(e, 8 + e)) for e in range(4)]
    removed = {"q_heads": [2, 3], "kv_heads": [1], "experts": [2], "expert_channels": channels}
    shared = [1, 9, 40] if WIDTHS[family][1] else []  # Qwen2-MoE: shared-expert channels too
    removed["mlp"] = shared
    masked = copy.deepcopy(model)
    _mask_router(masked, {i: [2] for i in range(3)})
    for i in range(3):
        _mask_channels(masked, i, channels)
        if shared:
            _mask_shared(masked, i, shared)
        ad = _adapter(masked)
        with torch.no_grad():  # KV group 1: query heads 2, 3 → their o_proj columns
            hd = ad.geometry(ad.layers[i]).head_dim
            ad.linear(ad.layers[i], "o").weight[:, 2 * hd :] = 0
    apply_plan(model, _plan(model, {i: removed for i in range(3)}))
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = fresh.generate(calib[:1, :5], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=2)
        b = fresh.generate(calib[:1, :5], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=2)
    assert a.shape[1] == 13 and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["kv_group", "q_head"])
@pytest.mark.parametrize("family", MOE)
def test_attention_units_on_moe_layers_equal_masking_and_reload(
    family: str, kind: str, calib, tmp_path: Path
) -> None:
    """KV groups and query heads (the Llama members: q/k/v rows, o_proj columns) on MoE layers: removal equals
    zeroing the o_proj columns the heads feed."""
    from prunelab.stages.surgery.apply import apply_plan

    model = _model(family)
    heads, removal = {
        "kv_group": ([2, 3], {"q_heads": [2, 3], "kv_heads": [1]}),
        "q_head": ([0, 3], {"q_heads": [0, 3]}),
    }[kind]
    masked = copy.deepcopy(model)
    ad = _adapter(masked)
    with torch.no_grad():
        for layer in ad.layers:
            hd = ad.geometry(layer).head_dim
            for h in heads:
                ad.linear(layer, "o").weight[:, h * hd : (h + 1) * hd] = 0
    apply_plan(model, _plan(model, {i: removal for i in range(3)}))
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)


@pytest.mark.parametrize("family", MOE)
def test_top_k_stays_valid_and_expert_widths_stay_equal(family: str) -> None:
    """Removing 3 of 4 experts with num_experts_per_tok = 2 is refused (the router could not pick 2); so are channel
    lists that leave experts of different widths (one fused tensor holds them)."""
    from prunelab.stages.surgery.apply import apply_plan
    from prunelab.stages.surgery.plan import PlanError

    model = _model(family)
    with pytest.raises(PlanError, match="num_experts_per_tok"):
        apply_plan(model, _plan(model, {i: {"experts": [0, 1, 2]} for i in range(3)}))
    model = _model(family)
    with pytest.raises(PlanError, match="same, nonzero number"):
        apply_plan(model, _plan(model, {i: {"expert_channels": [[1], [1, 2], [3], [4]]} for i in range(3)}))
    model = _model(family)
    with pytest.raises(PlanError, match="multiple of 8"):
        apply_plan(model, _plan(model, {i: {"expert_channels": [[1, 2, 3]] * 4} for i in range(3)}))


# ----------------------------------------------------------------------------- Qwen2-MoE's shared expert
def test_shared_expert_channel_removal_equals_masking_and_reloads_vanilla(calib, tmp_path: Path) -> None:
    """The shared expert is a dense MLP beside the routed experts: removing its channel c (gate/up row c, down column c)
    equals zeroing it — ``shared_expert_gate`` reads the hidden state, not a channel, and stays as it is — and the
    config's one ``shared_expert_intermediate_size`` follows (the dense ``intermediate_size`` is not its width), so a
    vanilla ``from_pretrained`` gives the same logits."""
    from prunelab.stages.surgery.apply import apply_plan

    model = _model("qwen2_moe")
    channels = [3, 17, 40]  # any count: the shared expert is plain linears (no grouped_mm alignment)
    masked = copy.deepcopy(model)
    for i in range(3):
        _mask_shared(masked, i, channels)
    gates = [ad_layer.mlp.shared_expert_gate.weight.clone() for ad_layer in _adapter(model).layers]
    apply_plan(model, _plan(model, {i: {"mlp": channels} for i in range(3)}))
    ad = _adapter(model)
    assert {(g.intermediate, g.experts, g.expert_intermediate) for g in ad.geometries()} == {(45, 4, 32)}
    assert (model.config.shared_expert_intermediate_size, model.config.intermediate_size) == (45, 128)
    assert not hasattr(model.config, "prunelab_layer_shapes")
    assert all(torch.equal(layer.mlp.shared_expert_gate.weight, g) for layer, g in zip(ad.layers, gates, strict=True))
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)


def test_shared_expert_widths_stay_uniform_and_mlp_is_refused_without_one() -> None:
    """transformers reads one shared-expert width from the config: different widths per layer are refused before a
    weight changes. Mixtral and Qwen3-MoE have no dense MLP: a plan with MLP channels is refused there."""
    from prunelab.stages.surgery.apply import apply_plan
    from prunelab.stages.surgery.plan import PlanError

    model = _model("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="uniform allocation"):
        apply_plan(model, _plan(model, {1: {"mlp": [3, 4]}}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for family in ("mixtral", "qwen3_moe"):
        model = _model(family)
        assert "mlp_channel" not in _adapter(model).UNIT_KINDS
        with pytest.raises(PlanError, match="MLP channel"):
            apply_plan(model, _plan(model, {i: {"mlp": [3]} for i in range(3)}))


def test_lora_targets_attention_and_the_shared_expert(calib, tmp_path: Path) -> None:
    """On Qwen2-MoE recovery's default LoRA targets are the attention projections and the shared expert's three (the
    fused experts are parameters, the router and the shared expert's gate are not targeted); after shared-expert
    channels go, a training step, the merge and a vanilla reload work."""
    from peft import get_peft_model

    from prunelab.stages.recovery.config import LoraSettings
    from prunelab.stages.recovery.model import lora_config
    from prunelab.stages.surgery.apply import apply_plan

    model = _model("qwen2_moe")
    apply_plan(model, _plan(model, {i: {"mlp": [0, 1, 2, 3]} for i in range(3)}))
    config = lora_config(LoraSettings(rank=2), model)
    config.init_lora_weights = False
    peft_model = get_peft_model(model, config)
    wrapped = {n.split(".layers.0.", 1)[1].removesuffix(".lora_A") for n, _ in peft_model.named_modules()
               if ".layers.0." in n and n.endswith(".lora_A")}
    assert wrapped == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.shared_expert.{p}_proj" for p in ("gate", "up", "down")}
    assert_lora_step_merges_and_reloads(peft_model, calib, tmp_path)


@pytest.mark.parametrize("extra", [{"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}])
def test_qwen2_moe_dense_mlp_layers_are_refused_with_the_reason(extra: dict, tmp_path: Path) -> None:
    """Layers that ``mlp_only_layers`` / ``decoder_sparse_step`` make a plain dense MLP are not supported: the adapter
    refuses the model, and --dry-run refuses its config.json before any work, saying why."""
    from prunelab.stages.arch import adapter_for

    model = _model("qwen2_moe", **extra)
    with pytest.raises(ValueError, match=r"dense-MLP layers \[.*mlp_only_layers"):
        adapter_for(model)
    folder = tmp_path / "model"
    model.config.save_pretrained(folder)
    rc, out = _dry_run("recipes/debug-qwen2_moe.yaml", tmp_path, f"model.source={folder}")
    assert rc != 0 and "dense-MLP layers" in out and "decoder_sparse_step: 1" in out, out


def test_shared_expert_channels_equal_the_dependency_graph(monkeypatch) -> None:
    """Issue 16 item 3 on Qwen2-MoE's shared expert: the ``mlp_channel`` members (gate/up rows, down columns of
    ``mlp.shared_expert``) equal the group torch-pruning's DependencyGraph finds from the shared gate_proj — the scalar
    ``shared_expert_gate`` and the routed experts are not in it — on the tiny model made multi-head, rotary traced as
    the identity."""
    import importlib

    from test_arch import _graph_group

    from prunelab.stages.io.tiny import tiny_family

    model = tiny_family("qwen2_moe", num_layers=2, kv_heads=4)
    monkeypatch.setattr(importlib.import_module(type(model).__module__), "apply_rotary_pos_emb", lambda q, k, *a, **kw: (q, k))
    ad = _adapter(model)
    units = [2, 5, 40]
    for i in range(ad.num_blocks):
        geo = ad.geometry(ad.layers[i])
        want = {(m.path, m.axis): sorted(m.index(units, geo)) for m in ad.members("mlp_channel")}
        assert _graph_group(model, i, "mlp_channel", units) == want


# ----------------------------------------------------------------------------- criteria
def _routed(model, layer: int, calib):
    """Brute force, from the model itself: the MoE block's input tokens, the router's top-k weights and indices."""
    ad = _adapter(model)
    seen = {}
    hook = ad.router(ad.layers[layer]).register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with torch.no_grad():
        model(calib)
    hook.remove()
    _, weights, index = seen["out"]
    return seen["x"].reshape(-1, seen["x"].shape[-1]), weights, index


@pytest.mark.parametrize("family", MOE)
def test_reap_and_frequency_norm_equal_their_formulas(family: str, calib) -> None:
    """REAP S_j = mean over tokens routed to j of g_j(x)·‖f_j(x)‖₂; frequency × norm S_j = |X_j|/|X| · mean ‖f_j(x)‖₂ —
    recomputed here from the router's own outputs and the expert tensors."""
    from prunelab.stages.criteria.scoring import score_criteria

    model = _model(family)
    results, _ = score_criteria("width", ["reap", "expert_frequency_norm"], model, calib, progress=False)
    ad = _adapter(model)
    for i in range(3):
        x, weights, index = _routed(model, i, calib)
        gate_up, down = ad.expert_weights(ad.layers[i])
        reap, freq = [], []
        for e in range(4):
            token, slot = torch.where(index == e)
            g, u = torch.nn.functional.linear(x[token], gate_up[e]).chunk(2, dim=-1)
            norm = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, down[e]).norm(dim=-1).double()
            reap.append((weights[token, slot].double() * norm).mean().item() if token.numel() else 0.0)
            freq.append(token.numel() / x.shape[0] * (norm.mean().item() if token.numel() else 0.0))
        assert results["reap"]["layers"][i]["experts"] == pytest.approx(reap, rel=1e-4)
        assert results["expert_frequency_norm"]["layers"][i]["experts"] == pytest.approx(freq, rel=1e-4)
    assert "arXiv 2510.13999" in results["reap"]["paper"]


@pytest.mark.parametrize("family", MOE)
def test_every_expert_criterion_scores_every_moe_layer(family: str, calib) -> None:
    """Experts: reap, expert_frequency_norm, magnitude, random; expert channels: magnitude, random, wanda_sp, flap;
    attention units keep their scores (taylor included) and MoE layers have no dense MLP channels."""
    from prunelab.stages.criteria import CRITERIA
    from prunelab.stages.criteria.scoring import score_criteria

    model = _model(family)
    names = ["reap", "expert_frequency_norm", "magnitude", "random", "wanda_sp", "flap", "taylor"]
    results, _ = score_criteria("width", names, model, calib, progress=False)
    inter = _adapter(model).geometry(_adapter(model).layers[0]).expert_intermediate
    for name in names:
        units = CRITERIA.get("width", name).units
        for layer in results[name]["layers"]:
            if "experts" in units:
                assert len(layer["experts"]) == 4
            if "expert_channels" in units:
                assert [len(c) for c in layer["expert_channels"]] == [inter] * 4
            if "kv_groups" in units:  # "mlp": Qwen2-MoE's shared-expert channels, none elsewhere
                assert len(layer["kv_groups"]) == 2 and len(layer["mlp"]) == WIDTHS[family][1]


def test_reap_picks_an_expert_that_adds_nothing(calib) -> None:
    """An expert whose down projection is zero adds nothing wherever it is routed: REAP and frequency × norm score it
    0, and the plan removes it in every layer."""
    from prunelab.stages.criteria.scoring import score_criteria
    from prunelab.stages.selection.config import WidthSettings
    from prunelab.stages.selection.planning import make_width_plan

    model = _model("mixtral")
    ad = _adapter(model)
    with torch.no_grad():
        for layer in ad.layers:
            ad.expert_weights(layer)[1][2] = 0
    results, _ = score_criteria("width", ["reap", "expert_frequency_norm"], model, calib, progress=False)
    for name in results:
        assert all(layer["experts"][2] == 0.0 for layer in results[name]["layers"])
    cfg = WidthSettings(criterion="reap", attention="none", mlp=False, experts={"ratio": 0.25})
    plan, _ = make_width_plan(results["reap"], cfg, model, None, results)
    assert all(r.experts == [2] for r in plan.layers.values())


# ----------------------------------------------------------------------------- settings and refusals
def test_expert_settings_are_typed_and_say_what_is_wrong() -> None:
    from pydantic import ValidationError

    from prunelab.stages.selection.config import WidthSettings

    ok = WidthSettings(
        criterion="wanda_sp",
        layer_ratio=0.5,
        mlp=False,
        experts={"ratio": 0.25, "criterion": "reap"},
        expert_channels={"ratio": 0.25},
    )
    assert ok.expert_channels.criterion == "wanda_sp" and ok.criteria() == ["wanda_sp", "reap"]
    assert (
        "experts" not in WidthSettings(criterion="flap", layer_ratio=0.2).model_dump()
    )  # old recipes hash as before
    for bad, says in [
        (
            {"experts": {"ratio": 0.25, "criterion": "taylor"}},
            "experts.criterion: criterion 'taylor' does not score experts",
        ),
        ({"expert_channels": {"ratio": 0.25, "criterion": "reap"}}, "does not score expert channels"),
        ({"experts": {"ratio": 1.5}}, "less than 1"),
        ({"experts": {"ratio": 0.25, "criteria": "reap"}}, "Extra inputs"),
        ({"experts": {"ratio": 0.25}, "layers": [0, 2]}, "remove `layers`"),
        ({"experts": {"ratio": 0.25}, "compensation": "bias"}, "compensation: none"),
    ]:
        with pytest.raises(ValidationError, match=says):
            WidthSettings(**{"criterion": "magnitude", "layer_ratio": 0.5, "mlp": False, **bad})
    with pytest.raises(ValidationError, match="remove the top-level ratio"):
        WidthSettings(criterion="reap", attention="none", mlp=False, layer_ratio=0.2, experts={"ratio": 0.25})
    with pytest.raises(ValidationError, match="does not score kv groups"):
        WidthSettings(criterion="reap", layer_ratio=0.2, mlp=False, experts={"ratio": 0.25})


def _dry_run(recipe: str, tmp_path: Path, *overrides: str) -> tuple[int, str]:
    import contextlib
    import io

    from prunelab.run import main

    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        rc = main([recipe, "--output-dir", str(tmp_path), "--no-progress", "--dry-run", *overrides])
    return rc, out.getvalue()


def test_dry_run_refuses_expert_units_on_a_dense_model_and_dense_units_on_moe(tmp_path: Path) -> None:
    rc, out = _dry_run("recipes/debug-mixtral.yaml", tmp_path, "model.source=tiny-random-llama")
    assert rc != 0 and "has no experts" in out and "experts:" in out and "expert_channels:" in out, out
    for family in MOE:  # mlp: true prunes Qwen2-MoE's shared expert; Mixtral and Qwen3-MoE have no dense MLP
        rc, out = _dry_run("recipes/debug-mixtral.yaml", tmp_path, f"model.source=tiny-random-{family}", "stages.prune.mlp=true")
        assert (rc == 0) == (family == "qwen2_moe") and (rc == 0 or "no dense MLP channels" in out), out
    for family in MOE:  # recipes/debug-qwen2_moe.yaml prunes shared-expert channels (mlp: true)
        rc, out = _dry_run(f"recipes/debug-{family}.yaml", tmp_path)
        assert rc == 0, out
    # layers of different widths cannot be saved for a MoE family (one config width): refused before any work
    rc, out = _dry_run("recipes/debug-qwen2_moe.yaml", tmp_path, "stages.prune.allocation=owl")
    assert rc != 0 and "cannot differ in width" in out, out


@pytest.mark.parametrize("family", MOE)
def test_attention_groups_on_moe_models_equal_the_dependency_graph(family: str, monkeypatch) -> None:
    """Issue 16 item 3 on the MoE families: where the graph resolves — a KV group's members (k/v rows, q rows,
    o_proj columns, Qwen3-MoE's per-head norms left out as on Qwen3) on the tiny model made multi-head, rotary traced
    as the identity — the adapter's group equals torch-pruning's, through the routed experts between the blocks."""
    import importlib

    from test_arch import _graph_group

    from prunelab.stages.io.tiny import tiny_family

    model = tiny_family(family, num_layers=2, kv_heads=4)
    monkeypatch.setattr(importlib.import_module(type(model).__module__), "apply_rotary_pos_emb", lambda q, k, *a, **kw: (q, k))
    ad = _adapter(model)
    for i in range(ad.num_blocks):
        geo = ad.geometry(ad.layers[i])
        want = {(m.path, m.axis): sorted(m.index([1], geo)) for m in ad.members("kv_group")}
        assert _graph_group(model, i, "kv_group", [1]) == want


@pytest.mark.parametrize("family", MOE)
def test_expert_units_are_outside_the_dependency_graph(family: str) -> None:
    """Issue 16 item 3 for the expert kinds: why torch-pruning cannot be their reference, checked rather than skipped.
    Experts are fused 3-D parameters indexed by data-dependent top-k routing (one_hot / where / index_add_ or
    grouped_mm), so the traced graph holds no router module and no op that couples router row e with expert slice e.
    If this fails, torch-pruning has learned to trace the routing: make it the reference for experts, as for heads."""
    import warnings

    tp = pytest.importorskip("torch_pruning")
    from prunelab.stages.io.tiny import tiny_family

    model = tiny_family(family, num_layers=2)
    ad = _adapter(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": torch.randint(3, 200, (1, 8))},
                                                      output_transform=lambda out: out.logits)
    layer, experts = ad.layers[0], [n for n, p in ad.layers[0].named_parameters() if p.dim() == 3]
    routers = [m for m in layer.modules() if type(m).__name__.endswith("Router")]
    assert routers and experts, f"{family}: expected a router module and fused 3-D expert parameters"
    for router in routers:  # the router is not even a node: nothing can couple its row e to expert e
        with pytest.raises(ValueError, match="not in the dependency graph"):
            graph.get_pruning_group(router, tp.prune_linear_out_channels, idxs=[1])
    names = {id(p): n for n, p in model.named_parameters()}
    fused = layer.get_parameter(experts[0])
    group = {names.get(id(getattr(dep.target.module, "weight", dep.target.module)))
             for dep, _ in graph.get_pruning_group(fused, tp.function.prune_parameter_out_channels, idxs=[1])}
    # Started from expert 1's slice, the graph reads the expert axis as a hidden channel: it cuts channel 1 of the norms
    # and the attention projections — the wrong unit — so our expert members are checked by masked == removed instead.
    assert f"{ad.block_prefix(0)}.input_layernorm.weight" in group, sorted(n for n in group if n)


# ----------------------------------------------------------------------------- one recipe per family, through the CLI
@pytest.mark.parametrize("family", MOE)
def test_debug_moe_recipe_prunes_recovers_and_exports(family: str, tmp_path: Path) -> None:
    """experts + expert channels (+ KV groups on Mixtral, + KV groups and shared-expert channels on Qwen2-MoE) + LoRA +
    export through the CLI; the export's reload check passes and a vanilla from_pretrained of the export generates
    with the KV cache."""
    import json

    from transformers import AutoModelForCausalLM

    from prunelab.run import main

    assert main([f"recipes/debug-{family}.yaml", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    run = tmp_path / f"debug-{family}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["params_after"] < metrics["model"]["params_before"]
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    ad = _adapter(model)
    assert model.config.model_type == family and {g.experts for g in ad.geometries()} == {3}
    assert {g.intermediate for g in ad.geometries()} == {WIDTHS[family][1] // 2}  # Qwen2-MoE: half its shared expert
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=2)
        b = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(a, b)
