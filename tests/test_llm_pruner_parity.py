"""Our LLM-Pruner options reproduce the official plan (horseee/LLM-Pruner 128a07d, ``llama3.py`` block-wise,
Taylor ``param_first``, group reduction ``sum``) on a tiny GQA model.

The official plan is derived here by hand, with plain torch, from the official algorithm (docs/llm-pruner-parity.md):

- one forward+backward of ``model(x, labels=x).loss`` on the whole calibration batch (10 windows);
- salience ``|W ⊙ ∂L/∂W|`` per weight (``param_first``), summed per output row (k/v/q/gate/up) or input column (o/down);
- a KV-group root (k_proj) aligns the longer members to its ``n_kv·hd`` channels with ``view(-1, n_kv·hd).sum(0)``,
  the members are summed per channel, and ``consecutive_groups = hd`` sums each head's channels;
- per layer and group: prune ``n − int(n·(1 − r))`` channels, as whole heads (``// hd``), lowest first (argsort);
  a KV head goes with the query heads that share it (repeat_kv: heads ``j·q_per_group …``).
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.calibration.full import collect_stats
from prunelab.stages.criteria.base import CriterionInputs
from prunelab.stages.criteria.settings import WidthGroupSettings
from prunelab.stages.criteria.width import taylor
from prunelab.stages.io.tiny import tiny_llama
from prunelab.stages.selection.width import select_uniform

RATIO = 0.3334  # the official run: removes one of three KV groups, and 33 of 96 MLP channels (nearest gives 32)
LAYERS = range(1, 5)  # as llama3.py's --block_*_layer_start 1 --block_*_layer_end 5


@pytest.fixture(scope="module")
def gqa_model():
    # 9 query heads over 3 KV heads (SmolLM2-135M's layout), head_dim 8
    return tiny_llama(num_layers=6, hidden=72, heads=9, kv_heads=3, intermediate=96, seed=0)


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(42)
    return torch.randint(3, 259, (10, 16), generator=gen)  # 10 calibration samples, as the official --num_examples


def _official_plan(model: torch.nn.Module, ids: torch.Tensor, r: float) -> dict[int, dict[str, list[int]]]:
    """The official LLM-Pruner plan, by hand (no prunelab code)."""
    model = copy.deepcopy(model)
    model.zero_grad()
    with torch.enable_grad():
        model(ids, labels=ids).loss.backward()  # one batch of all windows; HF's mean over every predicted token
    plan = {}
    for i in LAYERS:
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        sal = {n: (m.weight * m.weight.grad).abs().detach() for n, m in
               (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj))}
        kv_channels = attn.k_proj.weight.shape[0]
        hd = attn.k_proj.weight.shape[0] // model.config.num_key_value_heads
        q_per_group = model.config.num_attention_heads // model.config.num_key_value_heads
        # KV-group root: k rows + v rows + q rows and o columns folded onto k's channels (stride n_kv·hd)
        channel = (sal["k"].sum(1) + sal["v"].sum(1) + sal["q"].sum(1).view(-1, kv_channels).sum(0)
                   + sal["o"].sum(0).view(-1, kv_channels).sum(0))
        head = channel.view(-1, hd).sum(1)  # consecutive_groups = head_dim
        n_heads = (kv_channels - int(kv_channels * (1 - r))) // hd
        kv = sorted(torch.argsort(head)[:n_heads].tolist())
        # MLP root (gate_proj): gate rows + up rows + down columns
        imp = sal["gate"].sum(1) + sal["up"].sum(1) + sal["down"].sum(0)
        n = imp.numel()
        channels = sorted(torch.argsort(imp)[: n - int(n * (1 - r))].tolist())
        plan[i] = {"q_heads": [g * q_per_group + j for g in kv for j in range(q_per_group)], "kv_heads": kv,
                   "mlp": channels}
    return plan


def _our_plan(model, ids, grouping: str, counts: str, batch_size: int = 1) -> dict[int, dict[str, list[int]]]:
    stats = collect_stats(model, ids, {"grad"}, batch_size=batch_size, progress=False)
    scores = taylor(CriterionInputs(model, stats, settings=WidthGroupSettings(grouping=grouping))).layers
    geos = adapter_for(model).geometries()
    return select_uniform(scores, geos, list(LAYERS), "kv_group", True, RATIO, None, counts=counts)


def test_llm_pruner_options_reproduce_the_official_plan(gqa_model, windows):
    official = _official_plan(gqa_model, windows, RATIO)
    assert all(len(p["kv_heads"]) == 1 and len(p["q_heads"]) == 3 and len(p["mlp"]) == 33 for p in official.values())
    # our score stage takes one window per forward (batch_size 1): the mean of the windows' gradients is the
    # gradient of the batch mean, since every window has the same number of predicted tokens
    assert _our_plan(gqa_model, windows, "llm_pruner", "llm_pruner") == official
    assert _our_plan(gqa_model, windows, "llm_pruner", "llm_pruner", batch_size=10) == official


def test_the_default_options_are_not_the_official_plan(gqa_model, windows):
    """What the two options change on this model: without them the KV groups (query heads counted with the KV head
    they share) or the MLP counts (nearest rounding: 32, not 33) differ from the official plan."""
    official = _official_plan(gqa_model, windows, RATIO)
    units = _our_plan(gqa_model, windows, "units", "llm_pruner")
    assert [p["mlp"] for p in units.values()] == [p["mlp"] for p in official.values()]  # MLP scoring is the same
    assert [p["kv_heads"] for p in units.values()] != [p["kv_heads"] for p in official.values()]
    nearest = _our_plan(gqa_model, windows, "llm_pruner", "nearest")
    assert all(len(p["mlp"]) == 32 for p in nearest.values())


def test_official_kv_scores_fold_query_heads_with_stride_n_kv(gqa_model, windows):
    """The KV-group scores themselves, not only the choice: group j counts query heads j, j + 3, j + 6."""
    model = copy.deepcopy(gqa_model)
    stats = collect_stats(model, windows, {"grad"}, batch_size=1, progress=False)
    ours = taylor(CriterionInputs(model, stats, settings=WidthGroupSettings(grouping="llm_pruner"))).layers
    model.zero_grad()
    with torch.enable_grad():
        model(windows, labels=windows).loss.backward()
    attn, hd = model.model.layers[2].self_attn, 8
    s = {n: (getattr(attn, f"{n}_proj").weight * getattr(attn, f"{n}_proj").weight.grad).abs().detach() for n in "qkvo"}
    q_head = s["q"].sum(1).view(9, hd).sum(1)
    o_head = s["o"].sum(0).view(9, hd).sum(1)
    for j in range(3):
        expected = (s["k"][j * hd:(j + 1) * hd].sum() + s["v"][j * hd:(j + 1) * hd].sum()
                    + sum(q_head[j + 3 * r] + o_head[j + 3 * r] for r in range(3)))
        assert ours[2]["kv_groups"][j] == pytest.approx(expected.item(), rel=1e-4)


def test_new_options_leave_settings_dumps_of_earlier_runs_unchanged():
    from prunelab.stages.selection.config import UniformAllocation

    assert WidthGroupSettings(reduction="mean").model_dump(mode="json") == {"reduction": "mean"}
    assert WidthGroupSettings(grouping="llm_pruner").model_dump(mode="json")["grouping"] == "llm_pruner"
    assert UniformAllocation().model_dump(mode="json") == {"type": "uniform"}
    assert UniformAllocation(counts="llm_pruner").model_dump(mode="json") == {"type": "uniform", "counts": "llm_pruner"}


def test_the_official_recipe_validates():
    from prunelab.recipe import load_recipe

    recipe = load_recipe("recipes/smollm2/llm-pruner-official-20.yaml")
    score, prune = recipe.stages["score"], recipe.stages["prune"]
    assert score.settings["taylor"].grouping == "llm_pruner"
    assert prune.allocation.counts == "llm_pruner" and prune.layers == (4, 28) and prune.layer_ratio == pytest.approx(0.3334)


class _CharTokenizer:
    def __call__(self, text: str, return_tensors: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]]))


def test_llm_pruner_sampling_draws_the_official_windows():
    """``sampling: llm_pruner`` against the official ``get_bookcorpus`` loop, run here with the global ``random``."""
    from prunelab.stages.calibration.rows import llm_pruner_windows

    rows = [f"row {i} " * (i % 7) for i in range(60)]  # lengths 0 … 36+, many shorter than 16
    tok, n, seq_len = _CharTokenizer(), 8, 16
    state = random.getstate()
    try:
        random.seed(42)  # llama3.py's set_random_seed(42)
        samples, history = [], []
        for _ in range(n):
            while True:
                i = random.randint(0, len(rows) - 1)
                sample = tok(rows[i], return_tensors="pt")
                if sample.input_ids.shape[1] >= seq_len and i not in history:
                    history.append(i)
                    break
            i = random.randint(0, sample.input_ids.shape[1] - seq_len)
            samples.append(sample.input_ids[:, i:i + seq_len])
        official = torch.cat(samples, dim=0)
    finally:
        random.setstate(state)
    assert torch.equal(llm_pruner_windows(rows, tok, n, seq_len, seed=42), official)
    with pytest.raises(ValueError, match="rows tokenize"):
        llm_pruner_windows(rows, tok, 60, seq_len, seed=42)


def test_llm_pruner_sampling_is_an_option_of_text_sources_only():
    from prunelab.recipe import RecipeError, load_raw, load_recipe, validate

    recipe = load_recipe("recipes/smollm2/llm-pruner-official-20.yaml")
    assert recipe.stages["calibrate"].sampling == "llm_pruner"
    assert "sampling" not in load_recipe("recipes/smollm2/llm-pruner-units-20.yaml").stages["calibrate"].model_dump()
    assert load_recipe("recipes/smollm2/llm-pruner-20.yaml").stages["calibrate"].sampling == "llm_pruner"
    raw = load_raw("recipes/smollm2/llm-pruner-official-20.yaml")
    raw["stages"]["calibrate"]["source"] = {"self_generated": {}}
    with pytest.raises(RecipeError, match="sampling"):
        validate(raw)


def test_compare_script_refuses_a_checkout_without_the_official_package(tmp_path):
    """prunelab.benchmarks.compare_llm_pruner needs the official repository root (its LLMPruner/ package); anything
    else is refused before a model is loaded, naming the flag."""
    from prunelab.benchmarks.compare_llm_pruner import main

    with pytest.raises(SystemExit, match=r"--official .*no LLMPruner/torch_pruning inside"):
        main([str(tmp_path), "--official", str(tmp_path)])
