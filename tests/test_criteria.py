"""Block criteria against direct, independent computations of their papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from prunelab.stages.arch.llama import adapter_for
from prunelab.stages.calibration.blocks import naive_removal_nll
from prunelab.stages.calibration.full import collect_stats
from prunelab.stages.criteria.base import CriterionInputs
from prunelab.stages.criteria.depth import (
    angular_distance,
    block_influence,
    magnitude,
    ppl,
    random,
    sleb,
    taylor_plus,
)
from prunelab.stages.prune import prune_config
from prunelab.stages.selection.blocks import select_blocks
from prunelab.stages.selection.targets import round_count as _round
from prunelab.stages.surgery.apply import remove_blocks


def _inputs(model, calib, needs, **kw):
    stats = collect_stats(model, calib, needs, batch_size=2, progress=False)
    return CriterionInputs(model, stats, calibration=calib, batch_size=2, progress=False, **kw)


def _hidden_states(model, ids):
    """Boundary states from transformers itself (output_hidden_states), pre final norm."""
    out = model.model(input_ids=ids, output_hidden_states=True)
    hs = list(out.hidden_states)
    # transformers' last entry is post-norm; recompute the pre-norm output of the last block.
    adapter = adapter_for(model)
    return hs[:-1], adapter.boundary_states(ids)[-1]


def test_block_loop_matches_model_forward(tiny_model, calib):
    adapter = adapter_for(tiny_model)
    with torch.no_grad():
        states = adapter.boundary_states(calib)
        logits = tiny_model.lm_head(tiny_model.model.norm(states[-1]))
        ref = tiny_model(calib).logits
    assert torch.allclose(logits, ref, atol=1e-5)
    with torch.no_grad():
        hs, _ = _hidden_states(tiny_model, calib)
    for a, b in zip(states[:-1], hs):
        assert torch.allclose(a, b, atol=1e-5)


def test_block_influence_is_one_minus_mean_cosine(tiny_model, calib):
    result = block_influence(_inputs(tiny_model, calib, {"boundary"}))
    with torch.no_grad():
        states = adapter_for(tiny_model).boundary_states(calib)
    expected = [1 - torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1).mean().item() for i in range(6)]
    assert result.scores == pytest.approx(expected, abs=1e-5)


def test_angular_distance_windows_use_last_token(tiny_model, calib):
    result = angular_distance(_inputs(tiny_model, calib, {"boundary"}))
    with torch.no_grad():
        states = adapter_for(tiny_model).boundary_states(calib)
    for n in (1, 2, 3):
        for ell in range(6 - n + 1):
            cos = torch.nn.functional.cosine_similarity(states[ell][:, -1], states[ell + n][:, -1], dim=-1)
            expected = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
            assert result.windows[n][ell] == pytest.approx(expected, abs=1e-5)
    assert result.scores == result.windows[1]


def test_ppl_criterion_cached_equals_naive_full_forward(tiny_model, calib):
    inp = _inputs(tiny_model, calib, {"removal_nll"})
    result = ppl(inp)
    naive = naive_removal_nll(inp.adapter, calib, list(range(6)), batch_size=2)
    tokens = calib[:, 1:].numel()
    assert result.scores == pytest.approx([math.exp(v / tokens) for v in naive], rel=1e-5)
    # and equal to physically removing the block and running the HF model
    for block in (0, 3, 5):
        model = __import__("copy").deepcopy(tiny_model)
        remove_blocks(model, [block])
        with torch.no_grad():
            loss = model(calib, labels=calib).loss.item()
        assert result.scores[block] == pytest.approx(math.exp(loss), rel=1e-4)


def test_sleb_is_greedy_over_recomputed_perplexity(tiny_model, calib):
    inp = _inputs(tiny_model, calib, {"removal_nll"}, num_remove=3)
    result = sleb(inp)
    assert len(result.order) == 3 and len(set(result.order)) == 3
    # brute force: at every step remove the block whose removal gives the lowest calibration loss
    removed: list[int] = []
    for _ in range(3):
        best = None
        for cand in [b for b in range(6) if b not in removed]:
            model = __import__("copy").deepcopy(tiny_model)
            remove_blocks(model, sorted(removed + [cand]))
            with torch.no_grad():
                loss = model(calib, labels=calib).loss.item()
            if best is None or loss < best[0] - 1e-9:
                best = (loss, cand)
        removed.append(best[1])
    assert result.order == removed
    assert select_blocks(result.to_json(), 2) == sorted(removed[:2])


def test_taylor_plus_sums_abs_weight_times_grad_and_protects_ends(tiny_model, calib):
    inp = _inputs(tiny_model, calib, {"grad"})
    result = taylor_plus(inp)
    assert result.protected == [0, 1, 2, 3, 4, 5]  # 6 blocks: first 4 and last 2 cover everything
    model = tiny_model
    model.zero_grad()
    for start in range(0, calib.shape[0], 2):
        model(calib[start:start + 2], labels=calib[start:start + 2]).loss.backward()
    for i in range(6):
        expected = sum((p * p.grad).abs().sum().item() for n, p in model.model.layers[i].named_parameters() if n.endswith("weight"))
        assert result.extra["taylor_raw"][i] == pytest.approx(expected, rel=1e-4)
    model.zero_grad()


def test_taylor_plus_protection_on_deeper_model(calib):
    from prunelab.stages.io.tiny import tiny_llama

    model = tiny_llama(num_layers=9)
    result = taylor_plus(_inputs(model, calib, {"grad"}))
    assert result.protected == [0, 1, 2, 3, 7, 8]
    assert set(select_blocks(result.to_json(), 3)) <= {4, 5, 6}


def test_random_is_seeded_and_magnitude_is_l1(tiny_model, calib):
    inp = _inputs(tiny_model, calib, set())
    assert random(inp).scores == random(inp).scores
    inp2 = _inputs(tiny_model, calib, set(), seed=1)
    assert random(inp).scores != random(inp2).scores
    expected = [sum(p.abs().sum().item() for p in layer.parameters()) for layer in tiny_model.model.layers]
    assert magnitude(inp).scores == pytest.approx(expected, rel=1e-6)


def test_selection_rules():
    assert select_blocks({"scores": [5, 1, 3, 2, 9]}, 2) == [1, 3]
    assert select_blocks({"scores": [0, 1, 3, 2, 9], "protected": [0]}, 2) == [1, 3]
    assert select_blocks({"scores": [0] * 5, "windows": {"2": [0.5, 0.2, 0.3, 0.9]}}, 2) == [1, 2]
    assert select_blocks({"scores": [0] * 5, "order": [4, 0, 2]}, 2) == [0, 4]
    with pytest.raises(ValueError, match="only 1 blocks"):
        select_blocks({"scores": [1, 2], "protected": [0]}, 2)


def test_ratio_rounding():
    assert _round(7.6, "nearest") == 8 and _round(7.4, "nearest") == 7
    assert _round(7.6, "floor") == 7 and _round(7.2, "ceil") == 8 and _round(7.0, "ceil") == 7
    cfg = prune_config({"type": "prune", "criterion": "ppl", "ratio": 0.2})
    assert cfg.check_model(30, 134_515_008, 3_540_096) == []
    assert "would remove" in cfg.check_model(2, 100, 10)[0]
    assert "less than one block" in cfg.check_model(30, 100, 50)[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_removal_nll_wavefront_matches_hf_forward_for_both_attention_kernels(attn, calib):
    from prunelab.stages.io.tiny import tiny_llama

    model = tiny_llama(num_layers=5)
    model.config._attn_implementation = attn
    adapter = adapter_for(model)
    stats = collect_stats(model, calib, {"removal_nll"}, batch_size=3, progress=False)
    naive = naive_removal_nll(adapter, calib, list(range(5)), batch_size=1)
    assert stats.removal_nll.tolist() == pytest.approx(naive, rel=1e-5)
    assert [layer for layer in model.model.layers] == list(adapter.layers)  # reference restored the blocks
