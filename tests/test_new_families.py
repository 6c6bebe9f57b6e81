"""Issue 27's proof on real families: SmolLM3 (NoPE layers), OLMo 3 (sliding and full layers) and GLM-4 (fused
gate_up_proj, sandwich norms, partial rotary), each one file in stages/arch/ plus these tests.

The exactness suite is the other families' own (tests/test_arch.py, tests/test_sublayers.py), run here on the three
families' tiny models; only the 3-block model differs where a family's default would hide what makes it differ
(OLMo 3's default puts a full-attention layer every 4th block, so a 3-block model would be all sliding).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests import test_arch as arch
from tests import test_sublayers as sublayers

NEW = ["smollm3", "olmo3", "glm4"]
KINDS = ["block", *arch.UNITS, "hidden_channel"]
# The 3-block model of each family: SmolLM3's tiny facts make blocks 1, 3, … NoPE (and sliding) already.
THREE_BLOCKS: dict[str, dict] = {"olmo3": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}}


def _family(family: str) -> torch.nn.Module:
    from prunelab.stages.io.tiny import tiny_family

    return tiny_family(family, num_layers=3, **THREE_BLOCKS.get(family, {}))


@pytest.fixture(autouse=True)
def _three_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """test_arch's tests build their 3-block model through ``_family``: give them this file's."""
    monkeypatch.setattr(arch, "_family", _family)


# ----------------------------------------------------------------------------- the exactness suite of the others
@pytest.mark.parametrize("family", NEW)
def test_block_wise_forward_equals_the_model(family: str, calib: torch.Tensor) -> None:
    arch.test_block_wise_forward_equals_the_model(family, calib)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", NEW)
def test_masked_equals_removed_and_reloads_vanilla(family: str, kind: str, calib: torch.Tensor, tmp_path: Path) -> None:
    arch.test_masked_equals_removed_and_reloads_vanilla(family, kind, calib, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", NEW)
def test_lora_recovers_every_unit_kind(family: str, kind: str, calib: torch.Tensor, tmp_path: Path) -> None:
    arch.test_lora_recovers_every_unit_kind(family, kind, calib, tmp_path)


@pytest.mark.parametrize("family", NEW)
def test_uniform_width_pruning_reloads_vanilla_and_generates_with_cache(family: str, calib: torch.Tensor,
                                                                        tmp_path: Path) -> None:
    arch.test_uniform_width_pruning_reloads_vanilla_and_generates_with_cache(family, calib, tmp_path)


@pytest.mark.parametrize("family", NEW)
def test_heterogeneous_widths_reload_through_the_prunelab_loader(family: str, calib: torch.Tensor,
                                                                 tmp_path: Path) -> None:
    arch.test_heterogeneous_widths_reload_through_the_prunelab_loader(family, calib, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", NEW)
def test_adapter_groups_equal_the_dependency_graph(family: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    arch.test_adapter_groups_equal_the_dependency_graph(family, kind, monkeypatch)


@pytest.mark.parametrize("family", NEW)
def test_adapter_says_where_compensation_biases_can_live(family: str) -> None:
    arch.test_adapter_says_where_compensation_biases_can_live(family)


@pytest.mark.parametrize("method", ["bias", "optimal", "optimal_weights_only"])
@pytest.mark.parametrize("family", NEW)
def test_compensation_is_saved_where_the_family_can_hold_it(family: str, method: str, calib: torch.Tensor,
                                                            tmp_path: Path) -> None:
    arch.test_compensation_is_saved_where_the_family_can_hold_it(family, method, calib, tmp_path)


@pytest.mark.parametrize("family", NEW)
def test_every_criterion_scores_every_unit_on_every_family(family: str, calib: torch.Tensor) -> None:
    arch.test_every_criterion_scores_every_unit_on_every_family(family, calib)


@pytest.mark.parametrize("family", NEW)
def test_sublayers_removed_equal_masked(family: str) -> None:
    sublayers.test_removed_equals_masked(family)


@pytest.mark.parametrize("family", NEW)
def test_sublayers_removed_generate_with_cache(family: str) -> None:
    sublayers.test_generate_with_cache(family)


# ----------------------------------------------------------------------------- what makes each family differ
def test_smollm3_block_removal_keeps_each_layers_rope() -> None:
    """``no_rope_layers`` is per layer: removing NoPE block 1 of [rope, NoPE, rope] leaves [rope, rope], so a vanilla
    reload builds both kept layers with rotary (as the pruned model has them) — and the same for the windows."""
    from prunelab.stages.surgery.apply import apply_plan

    model = _family("smollm3")
    assert model.config.no_rope_layers == [1, 0, 1]
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    apply_plan(model, {"kind": "depth", "removed_blocks": [1], "layers_before": 3})
    assert model.config.no_rope_layers == [1, 1] and model.config.layer_types == ["full_attention"] * 2
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [1, 1]


def test_olmo3_block_removal_keeps_each_layers_kind() -> None:
    """Removing the full-attention block of [sliding, full, sliding] leaves two sliding layers, each given the sliding
    mask and the sliding rope base by the block-wise forward."""
    from prunelab.stages.arch import adapter_for
    from prunelab.stages.surgery.apply import apply_plan

    model = _family("olmo3")
    apply_plan(model, {"kind": "depth", "removed_blocks": [1], "layers_before": 3})
    assert model.config.layer_types == ["sliding_attention"] * 2
    ids = torch.randint(3, 259, (1, 24), generator=torch.Generator().manual_seed(0))
    ad = adapter_for(model)
    with torch.no_grad():
        nll, n = ad.nll_sum(ad.boundary_states(ids)[-1], ids)
        assert nll / n == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)


def test_glm4_mlp_channels_are_rows_of_both_halves_of_gate_up() -> None:
    from prunelab.stages.arch import adapter_for

    model = _family("glm4")
    ad = adapter_for(model)
    layer = ad.layers[0]
    geo = ad.geometry(layer)
    assert geo.intermediate == model.config.intermediate_size == layer.mlp.gate_up_proj.out_features // 2
    gate_up = ad.members("mlp_channel")[0]
    assert gate_up.path == "mlp.gate_up_proj" and gate_up.index([3, 7], geo) == [3, 7, 131, 135]
    assert ad.role_rows(layer, "up") == slice(128, 256) and ad.lora_targets() == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_glm4_removed_sublayer_takes_both_its_norms_and_reloads(tmp_path: Path) -> None:
    """A removed GLM-4 sublayer leaves no parameter behind (its pre- and post-norm go with it); the saved model
    reloads through the prunelab loader (which rebuilds the no-ops from the per-layer shapes) with the same logits."""
    from prunelab.stages.arch import adapter_for
    from prunelab.stages.io.loader import load_pruned
    from prunelab.stages.surgery.apply import set_width_config
    from prunelab.stages.surgery.sublayers import remove_sublayers

    model = _family("glm4")
    one, two = model.model.layers[1], model.model.layers[2]
    gone = sum(p.numel() for m in (one.self_attn, one.input_layernorm, one.post_self_attn_layernorm, two.mlp,
                                   two.post_attention_layernorm, two.post_mlp_layernorm) for p in m.parameters())
    ad = adapter_for(model)
    before = ad.total_params()
    remove_sublayers(model, [1], [2])
    assert ad.total_params() == before - gone
    assert isinstance(one.post_self_attn_layernorm, torch.nn.Identity)
    assert isinstance(two.post_mlp_layernorm, torch.nn.Identity)
    set_width_config(model, [{"num_attention_heads": g.n_q, "num_key_value_heads": g.n_kv,
                              "intermediate_size": g.intermediate} for g in ad.geometries()])
    model.save_pretrained(tmp_path)
    fresh = load_pruned(tmp_path).eval()
    assert adapter_for(fresh).total_params() == ad.total_params()
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)  # same weights, same ops


# ----------------------------------------------------------------------------- --dry-run and the debug recipes
def test_dry_run_accepts_the_new_families_and_refuses_the_bias_they_cannot_hold(tmp_path: Path) -> None:
    """Refused before these files (``model_type … has no architecture adapter``); now accepted, and bias compensation
    is refused exactly where transformers builds o_proj / down_proj without a bias (SmolLM3 has Llama's flags)."""
    for family in NEW:
        rc, out = arch._debug_width_on(f"tiny-random-{family}", tmp_path)
        assert (rc == 0) == (family == "smollm3"), out
        assert "no architecture adapter" not in out, out
        if family != "smollm3":
            assert "without a bias" in out, out
            rc, out = arch._debug_width_on(f"tiny-random-{family}", tmp_path, "stages.prune.compensation=none")
            assert rc == 0, out


def test_dry_run_reads_a_saved_folder_of_each_family(tmp_path: Path) -> None:
    """A local folder's config.json (what a downloaded checkpoint gives) is recognised from its metadata alone."""
    from prunelab.stages.io.tiny import tiny_family

    for family in NEW:
        tiny_family(family, num_layers=2).save_pretrained(tmp_path / family)
        rc, out = arch._debug_width_on(str(tmp_path / family), tmp_path, "stages.prune.compensation=none")
        assert rc == 0, out
        assert json.loads((tmp_path / family / "config.json").read_text())["model_type"] == family


@pytest.mark.parametrize("family", NEW)
def test_every_family_has_a_debug_recipe_on_its_tiny_model(family: str) -> None:
    arch.test_every_family_has_a_debug_recipe_on_its_tiny_model(family)


@pytest.mark.parametrize("family", NEW)
def test_debug_family_recipe_prunes_recovers_and_exports(family: str, tmp_path: Path) -> None:
    arch.test_debug_family_recipe_prunes_recovers_and_exports(family, tmp_path)


def test_building_a_tiny_model_leaves_its_facts_unchanged() -> None:
    """The tiny facts are read, never written: building a model twice gives the same config (nested rope dicts)."""
    from prunelab.stages.arch import family_facts

    tiny = copy.deepcopy(dict(family_facts("olmo3").tiny))
    _family("olmo3")
    _family("olmo3")
    assert dict(family_facts("olmo3").tiny) == tiny


@pytest.mark.parametrize("family", NEW)
def test_dry_run_counts_the_parameters_the_model_has(family: str) -> None:
    """--dry-run's parameter count from config.json alone (GLM-4: q/k/v biases from attention_bias, none on o_proj;
    four norms per layer; OLMo 3: projection-wide q/k norms) equals the built model's."""
    from prunelab.stages.io.sources import shape_from_config
    from prunelab.stages.io.tiny import tiny_family

    model = tiny_family(family, num_layers=2)
    total, block = shape_from_config(model.config.to_dict()).param_counts()
    assert total == sum(p.numel() for p in model.parameters())
    assert block == sum(p.numel() for p in model.model.layers[0].parameters())
