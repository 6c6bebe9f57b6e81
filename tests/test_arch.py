"""The architecture adapters (stages/arch/): the registry, the rule that only adapters name modules, and the
family matrix — every supported family's tiny random model (built offline from its transformers config class)
pruned per unit kind: masked == removed, vanilla ``from_pretrained`` reload equal, KV-cache ``generate``."""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import pytest
import torch
from exactness import assert_lora_step_merges_and_reloads, assert_masked_and_reload_equal

ROOT = Path(__file__).resolve().parents[1]
# The module names transformers gives a decoder-only model's parts. Outside stages/arch/ code asks the adapter; a
# spelling anywhere in code (an attribute, a string, a getattr name, an identifier) is a leak.
MODULE_TOKENS = ("lm_head", "embed_tokens", "self_attn", "input_layernorm", "post_attention_layernorm",
                 "pre_feedforward_layernorm", "post_feedforward_layernorm", "rotary_emb", "q_norm", "k_norm",
                 "shared_expert", "shared_expert_gate")
MODULE_NAME = re.compile(r"\b(?:(?:q|k|v|o|gate|up|down|qkv|gate_up)_proj|" + "|".join(MODULE_TOKENS) + r")\b")
# Dotted paths in strings: the Llama base model's parts, an MoE MLP's parts, a block list entry (``.layers.3.``).
MODULE_PATH = re.compile(r"\bmodel\.(?:model|layers|norm|embed_tokens)\b|\bmlp\.(?:experts|gate|shared_expert)\b|\.layers\.")
# ``<x>model.model`` / ``.model.layers`` / ``.model.norm``: attributes of a transformers base model reached by name.
BASE_MODEL_PARTS = {"model", "layers", "norm"}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _tail(node: ast.AST) -> str | None:
    """The last name of an expression (``a.b.model`` → ``model``; a call: its function's)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _tail(node.func)
    return None


def _spelling(node: ast.AST, docs: set[int]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
        return repr(node.value) if MODULE_NAME.search(node.value) or MODULE_PATH.search(node.value) else None
    if isinstance(node, ast.Attribute):
        leak = MODULE_NAME.fullmatch(node.attr) or (node.attr in BASE_MODEL_PARTS and _tail(node.value) == "model")
        return f"{_tail(node.value)}.{node.attr}" if leak else None
    name = (node.id if isinstance(node, ast.Name) else
            getattr(node, "name", None) or getattr(node, "arg", None) or getattr(node, "asname", None)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.arg, ast.keyword, ast.alias))
            else None)
    return name if name and MODULE_NAME.search(name) else None


def _spellings(path: Path) -> list[str]:
    """Module names in code — identifiers, attributes (``model.model``, ``x.lm_head``), non-docstring strings
    (``"q_proj"``, ``getattr(m, "embed_tokens")``, ``"model.layers.0."``); comments and docstrings are prose and may
    name them."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    return [f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}: {hit}"
            for node in ast.walk(tree) if (hit := _spelling(node, docs))]


# Files besides stages/arch/ allowed to spell module names, each because it writes another engine's checkpoint
# layout — a table from the transformers names to that engine's, checked against the engine's own source — and
# refuses a family it has no table for: the GGUF tensor map (llama.cpp's names per transformers module) and vLLM's
# DeciLM weight names. Nothing else: a new entry needs the same reason.
ENGINE_LAYOUTS = {ROOT / "stages" / "io" / "gguf_export.py", ROOT / "stages" / "io" / "export_vllm.py"}


def test_only_adapters_name_modules() -> None:
    files = [p for p in sorted((ROOT / "stages").rglob("*.py")) + sorted((ROOT / "pipeline").rglob("*.py"))
             if not p.is_relative_to(ROOT / "stages" / "arch") and p not in ENGINE_LAYOUTS]
    bad = [b for p in files for b in _spellings(p)]
    assert not bad, "module names belong in stages/arch/ (ask the adapter):\n" + "\n".join(bad)


def test_the_scan_sees_every_spelling(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text('''"""o_proj, lm_head and model.model in a docstring are fine."""
# so is q_proj in a comment
x = model.model.layers
h = model.model(input_ids=ids).last_hidden_state
y = "mlp.down_proj"
head = getattr(model, "lm_head")
z = net.lm_head.weight
emb = model.embed_tokens
ok = adapter.model.config, adapter.layers, settings.mlp, "mlp", "layers"
def f(q_proj): return state["model.layers.3.input_layernorm.weight"]
''')
    found = [b.split(": ", 1)[1] for b in _spellings_at(probe)]
    assert sorted(found) == sorted(["model.model", "model.layers", "model.model", "'mlp.down_proj'", "'lm_head'",
                                    "net.lm_head", "model.embed_tokens", "q_proj",
                                    "'model.layers.3.input_layernorm.weight'"]), found


def _spellings_at(path: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return _spellings(path)
    finally:
        ROOT = saved


# ----------------------------------------------------------------------------- registry
def test_registry_refuses_duplicates_and_names_what_is_missing() -> None:
    from prunelab.stages.arch import adapter_class, register_family, supported_model_types, unsupported_message
    from prunelab.stages.arch.facts import FamilyFacts

    assert {"gemma2", "gemma3_text", "granite", "llama", "mistral", "mixtral", "olmo2", "phi3", "qwen2", "qwen2_moe",
            "qwen3", "qwen3_moe"} <= set(supported_model_types())
    for t in supported_model_types():
        assert t in adapter_class(t).model_types and adapter_class(t).FACTS.model_types == adapter_class(t).model_types
    before = supported_model_types()
    with pytest.raises(ValueError, match="'llama' is already registered"):  # all or none: 'fresh' is not registered
        register_family(FamilyFacts(model_types=("fresh", "llama"), adapter="prunelab.stages.arch.llama:LlamaAdapter"))
    assert supported_model_types() == before
    with pytest.raises(ValueError, match="no architecture adapter.*gemma2, gemma3_text, .*granite, llama, mistral, mixtral, .*geometry"):
        adapter_class("gpt2")
    assert "register_family" in unsupported_message("gpt2")


@pytest.mark.parametrize(("facts", "message"), [
    ({"adapter": "LlamaAdapter"}, "'package.module:ClassName'"),
    ({"model_types": ()}, "model_types"),
    ({"shared_expert": True}, "shared_expert: true needs moe: true"),
    ({"no_output_bias": ("q",)}, "no_output_bias"),
    ({"per_layer_engines": ("tgi",)}, "per_layer_engines"),
    ({"moe": True, "sublayers": True}, "sublayers: true is not implemented for mixture-of-experts"),
])
def test_family_facts_refuse_what_cannot_be_true(facts: dict, message: str) -> None:
    from pydantic import ValidationError

    from prunelab.stages.arch.facts import FamilyFacts

    with pytest.raises(ValidationError, match=message):
        FamilyFacts(**{"model_types": ("x",), "adapter": "m:A", **facts})


def test_family_facts_are_read_without_torch() -> None:
    """--dry-run and recipe validation read every family's facts (and import every family file) without torch."""
    import subprocess
    import sys

    code = ("import sys; from prunelab.stages.arch import NO_OUTPUT_BIAS, adapter_class, supported_model_types; "
            "from prunelab.stages.io.sources import TINY_SHAPES; "
            "assert len(supported_model_types()) >= 12 and len(TINY_SHAPES) >= 12 and NO_OUTPUT_BIAS; "
            "[adapter_class(t).linear_paths() for t in supported_model_types()]; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "granite", "phi3", "gemma2", "gemma3_text", "olmo2"]
LORA_FAMILIES = FAMILIES  # fused targets (Phi-3) resolve through the adapter (stages.recovery.model.lora_config)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_says_where_compensation_biases_can_live(family: str) -> None:
    """``NO_OUTPUT_BIAS`` (torch-free, read by --dry-run) agrees with the adapter and with what transformers builds
    when every bias flag the adapter knows is switched on."""
    from prunelab.stages.arch import NO_OUTPUT_BIAS, adapter_class, compensation_refusal
    from prunelab.stages.io.tiny import tiny_family

    cls = adapter_class(family)
    holders = cls.bias_holders(None)
    assert {r for r, ok in holders.items() if not ok} == set(NO_OUTPUT_BIAS.get(family, ()))
    assert (compensation_refusal(family) is None) == all(holders.values())
    model = tiny_family(family, num_layers=1, **{flag: True for flag in cls.bias_flags().values()})
    layer = cls(model).layers[0]
    assert {r: cls.linear(layer, r).bias is not None for r in ("o", "down")} == holders


# ----------------------------------------------------------------------------- the family matrix
def _family(family: str):
    from prunelab.stages.io.tiny import tiny_family

    return tiny_family(family, num_layers=3)


def _mask_units(model, layer_idx: int, kind: str, units: list[int]) -> None:
    """Zero what a unit owns, as the adapter's members say (rows and bias entries of "out" members, columns of
    "in" members) — the masking twin of physical removal."""
    from prunelab.stages.arch import adapter_for

    ad = adapter_for(model)
    layer = ad.layers[layer_idx]
    geo = ad.geometry(layer)
    with torch.no_grad():
        for m in ad.members(kind):
            if m.axis == "norm":  # a norm over the projection (OLMo 2) sees zeros there already; removal rescales it
                continue
            lin = layer.get_submodule(m.path)
            idx = m.index(units, geo)
            if m.axis == "out":
                lin.weight[idx] = 0
                if lin.bias is not None:
                    lin.bias[idx] = 0
            else:
                lin.weight[:, idx] = 0


def _mask_block(model, index: int) -> None:
    """A block whose output projections (and their biases) are zero adds nothing to the residual stream."""
    from prunelab.stages.arch import adapter_for

    ad = adapter_for(model)
    with torch.no_grad():
        for role in ("o", "down"):
            lin = ad.linear(ad.layers[index], role)
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


UNITS = {  # unit kind → (masked units per layer, the width plan's removal per layer)
    "kv_group": ([1], {"q_heads": [2, 3], "kv_heads": [1], "mlp": []}),
    "q_head": ([0, 3], {"q_heads": [0, 3], "kv_heads": [], "mlp": []}),
    "mlp_channel": ([3, 17, 100], {"q_heads": [], "kv_heads": [], "mlp": [3, 17, 100]}),
}


@pytest.mark.parametrize("family", [*FAMILIES, "mixtral", "qwen3_moe", "qwen2_moe"])
def test_block_wise_forward_equals_the_model(family: str, calib) -> None:
    """The adapter's block-by-block run (what SLEB, the PPL criterion, LaCo use) reproduces the model's loss —
    masks (Mistral's window of 12 < 24 tokens), rotary, per-head norms, MoE layers (whose router outputs the
    layer does not return) included."""
    from prunelab.stages.arch import adapter_for

    model = _family(family)
    ad = adapter_for(model)
    with torch.no_grad():
        nll, n = ad.nll_sum(ad.boundary_states(calib)[-1], calib)
        ref = model(input_ids=calib, labels=calib).loss.item()
    assert nll / n == pytest.approx(ref, rel=1e-5)


def _prune(model, kind: str, masked=None) -> None:
    """Remove one unit kind from ``model`` (width units: the same units in every layer, so widths stay uniform)
    and, when given, mask the same units in ``masked``."""
    from prunelab.stages.surgery.apply import apply_plan
    from tests.test_hidden import _hidden_plan, _mask_hidden
    from tests.test_width import _plan

    n = model.config.num_hidden_layers
    if kind == "block":
        if masked is not None:
            _mask_block(masked, 1)
        apply_plan(model, {"kind": "depth", "removed_blocks": [1], "layers_before": n})
    elif kind == "hidden_channel":
        removed = [0, 5, 17, 22, 31, 40, 50, 63]
        if masked is not None:
            _mask_hidden(masked, removed)
        apply_plan(model, _hidden_plan(model, removed))
    else:
        units, removal = UNITS[kind]
        for i in range(n):
            if masked is not None:
                _mask_units(masked, i, kind, units)
        apply_plan(model, _plan(model, dict.fromkeys(range(n), removal)))


@pytest.mark.parametrize("kind", ["block", *UNITS, "hidden_channel"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_removed_and_reloads_vanilla(family: str, kind: str, calib, tmp_path: Path) -> None:
    """One unit kind removed (width units: the same units in every layer, so the widths stay uniform): the logits
    equal the masked model's, and a vanilla ``from_pretrained`` of the saved result gives them again."""

    model = _family(family)
    masked = copy.deepcopy(model)
    _prune(model, kind, masked)
    assert not hasattr(model.config, "prunelab_layer_shapes")
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_width_pruning_reloads_vanilla_and_generates_with_cache(family: str, calib, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from prunelab.stages.surgery.apply import apply_plan
    from tests.test_width import _plan

    model = _family(family)
    removed = {"q_heads": [0, 1], "kv_heads": [0], "mlp": [1, 9, 40]}
    apply_plan(model, _plan(model, {i: removed for i in range(3)}))
    assert not hasattr(model.config, "prunelab_layer_shapes")
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (fresh(calib).logits - model(calib).logits).abs().max().item() <= 1e-5
        a = fresh.generate(calib[:1, :5], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=2)
        b = fresh.generate(calib[:1, :5], max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=2)
    assert a.shape[1] == 13 and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["block", *UNITS, "hidden_channel"])
@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_lora_recovers_every_unit_kind(family: str, kind: str, calib, tmp_path: Path) -> None:
    """Recovery's default LoRA targets resolve through the adapter to every decoder linear of the family (a fused
    ``qkv_proj`` / ``gate_up_proj`` once); on the pruned model a training step lowers nothing to NaN, and the merged
    model reloads in vanilla transformers."""
    from peft import get_peft_model

    from prunelab.stages.arch import adapter_for
    from prunelab.stages.recovery.config import LoraSettings
    from prunelab.stages.recovery.model import lora_config

    model = _family(family)
    ad = adapter_for(model)
    config = lora_config(LoraSettings(rank=2), model)
    assert sorted(config.target_modules) == sorted(ad.lora_targets())
    config.init_lora_weights = False
    _prune(model, kind)
    peft_model = get_peft_model(model, config)
    assert len([n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]) == ad.num_blocks * len(ad.lora_targets())
    assert_lora_step_merges_and_reloads(peft_model, calib, tmp_path)


@pytest.mark.parametrize("family", [*FAMILIES, "mixtral", "qwen3_moe", "qwen2_moe"])
def test_qlora_trains_the_adapter_targets_of_every_family(family: str, tmp_path: Path) -> None:
    """QLoRA (NF4 base on CPU through bitsandbytes) finds the family's targets through the adapter — a fused
    ``qkv_proj`` once, a MoE model's attention (and Qwen2-MoE's shared expert) but never its fused experts — trains
    them, and merges into full-precision weights that reload in vanilla transformers."""
    pytest.importorskip("bitsandbytes")
    from accelerate import Accelerator
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from prunelab.stages.arch import adapter_for
    from prunelab.stages.io.tiny import byte_tokenizer
    from prunelab.stages.recovery.config import RecoverySettings
    from prunelab.stages.recovery.trainer import TrainerEnv, recover_model

    model = _family(family)
    ad = adapter_for(model)
    cfg = RecoverySettings(method="qlora", data={"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 32,
                                                 "max_samples": 8},
                           lora={"dropout": 0.0, "rank": 2}, optimizer={"lr": 5e-3},
                           loop={"batch_size": 2, "micro_batch_size": 2, "max_steps": 2})
    env = TrainerEnv(accelerator=Accelerator(cpu=True), tokenizer=byte_tokenizer(), seed=0, progress=False)
    merged = recover_model(env, cfg, model, tmp_path, "pruned").pop("model")
    trained = {k.split(".lora_A")[0].rsplit(".", 1)[-1]
               for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")) if ".lora_A" in k}
    assert trained == set(ad.lora_targets())
    merged.save_pretrained(tmp_path / "merged")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.arange(3, 35).view(1, -1)
    with torch.no_grad():
        out = merged.eval()(ids).logits
        assert torch.isfinite(out).all()
        assert (fresh(ids).logits - out).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- --dry-run: families and compensation
def _debug_width_on(source: str, tmp_path: Path, *extra: str) -> tuple[int, str]:
    """recipes/debug-width.yaml (FLAP, global allocation, bias compensation) with only ``model.source`` changed."""
    import contextlib
    import io

    from prunelab.run import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        rc = main(["recipes/debug-width.yaml", "--output-dir", str(tmp_path), "--no-progress", "--dry-run",
                   f"model.source={source}", *extra])
    return rc, err.getvalue()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2"])
def test_dry_run_refuses_compensation_bias_a_family_cannot_hold(family: str, tmp_path: Path) -> None:
    """Issue 16 item 5: on Qwen2 such a run used to reach the end and fail the export's reload check."""
    rc, out = _debug_width_on(f"tiny-random-{family}", tmp_path)
    assert rc != 0 and "bias compensation" in out and "without a bias" in out, out
    rc, out = _debug_width_on(f"tiny-random-{family}", tmp_path, "stages.prune.compensation=none")
    assert rc == 0, out


def test_dry_run_refuses_a_model_type_without_an_adapter(tmp_path: Path) -> None:
    """Issue 16 item 6: the message lists the supported families and what an adapter provides."""
    import json

    from prunelab.stages.arch import supported_model_types

    configs = {"gpt2": {"model_type": "gpt2", "n_layer": 2, "vocab_size": 259},  # sizes under other names
               "olmo": {"model_type": "olmo", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                        "num_attention_heads": 4, "vocab_size": 259}}
    for model_type, config in configs.items():
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        rc, out = _debug_width_on(str(folder), tmp_path)
        assert rc != 0 and f"{model_type!r} has no architecture adapter" in out, out
        assert f"supported families: {', '.join(supported_model_types())}." in out and "register_family" in out
        assert "geometry" in out


# ----------------------------------------------------------------------------- one recipe per family, through the CLI
DEBUG_RECIPES = sorted((ROOT / "recipes").glob("debug-*.yaml"))


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_every_family_has_a_debug_recipe_on_its_tiny_model(family: str) -> None:
    import yaml

    path = ROOT / "recipes" / f"debug-{family}.yaml"
    assert path in DEBUG_RECIPES
    assert yaml.safe_load(path.read_text())["model"]["source"] == f"tiny-random-{family}"


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_debug_family_recipe_prunes_recovers_and_exports(family: str, tmp_path: Path) -> None:
    """prune (uniform width) + recover (LoRA) + export through the CLI; the export's own reload check passes and
    a vanilla from_pretrained of the export generates with the KV cache."""
    import json

    from transformers import AutoModelForCausalLM

    from prunelab.run import main

    assert main([f"recipes/debug-{family}.yaml", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    run = tmp_path / f"debug-{family}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["params_after"] < metrics["model"]["params_before"]
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    assert model.config.model_type == family
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=2)
        b = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(a, b)


def test_the_family_table_names_tests_that_exist() -> None:
    """docs/families.md: every cell's test is a parametrization of a test in this file."""
    text = (ROOT / "docs" / "families.md").read_text()
    short = {"M": "test_masked_equals_removed_and_reloads_vanilla", "L": "test_lora_recovers_every_unit_kind",
             "R": "test_debug_family_recipe_prunes_recovers_and_exports", "G": "test_adapter_groups_equal_the_dependency_graph"}
    kinds = {"block", *UNITS, "hidden_channel"}
    cells = [c for c in re.findall(r"`([MLRG])\[([a-z0-9_]+?)(?:-([a-z_]+))?\]`", text) if c[1] != "f"]  # not the legend
    assert len(cells) >= (len(FAMILIES) + len(LORA_FAMILIES)) * len(kinds)
    for letter, family, kind in cells:
        assert short[letter] in globals() and family in FAMILIES and (kind in kinds or (letter == "R" and not kind))
    for name in re.findall(r"`(test_[a-z_0-9]+)", text):
        assert name in globals(), name


@pytest.mark.parametrize("family", FAMILIES)
def test_every_criterion_scores_every_unit_on_every_family(family: str, calib) -> None:
    """Issue 16 item 4: every depth criterion, every width criterion (with its hidden-channel scores) and every
    allocation's inputs (OWL's outlier ratios, AlphaPruning's α) on each family's tiny model."""
    import math

    from prunelab.stages.arch import adapter_for
    from prunelab.stages.calibration.full import collect_stats
    from prunelab.stages.calibration.width import summary_tensors
    from prunelab.stages.criteria import CRITERIA, criteria_for
    from prunelab.stages.criteria.base import CriterionInputs
    from prunelab.stages.criteria.scoring import needs_for, score
    from prunelab.stages.criteria.settings import LacoSettings
    from prunelab.stages.prune import prune_config
    from prunelab.stages.selection.alpha import layer_alphas
    from prunelab.stages.selection.owl import owl_offsets

    model = _family(family)
    ad = adapter_for(model)
    geos = ad.geometries()
    for kind, units in (("width", "width"), ("depth", "blocks")):
        # expert-only criteria (reap, expert_frequency_norm: tests/test_moe.py) score nothing on a dense model
        # sublayer criteria only where the adapter can remove a sublayer (tests/test_sublayers.py refuses the rest)
        names = [n for n in criteria_for(units) if "kv_groups" in CRITERIA.get(kind, n).units
                 and (not n.startswith("sublayer_") or type(ad).SUBLAYER_REMOVAL)]
        stats = collect_stats(model, calib, needs_for(kind, names, {"hidden", "hessian"} if kind == "width" else ()),
                              batch_size=1, progress=False)
        for name in names:
            settings = LacoSettings(merge_layers=2, threshold=-0.99) if name == "laco" else None
            # sublayer_sleb removes sublayers until a later units: sublayers prune's target: one here
            prune = prune_config({"type": "prune", "units": "sublayers", "criterion": name, "num_sublayers": 1}) \
                if name == "sublayer_sleb" else None
            res = score(CRITERIA.get(kind, name), CriterionInputs(model, stats, calibration=calib, num_remove=1,
                                                                  settings=settings, progress=False, prune=prune),
                        hidden=kind == "width")
            if kind == "depth":
                assert len(res.scores) == ad.num_blocks, name
                continue
            assert [(len(r["q_heads"]), len(r["kv_groups"]), len(r["mlp"])) for r in res.layers] == \
                [(g.n_q, g.n_kv, g.intermediate) for g in geos], name
            assert all(math.isfinite(v) for r in res.layers for v in r["mlp"] + r["q_heads"]), name
            assert res.hidden is None or len(res.hidden) == model.config.hidden_size, name
        if kind == "width":
            offsets = owl_offsets(model, summary_tensors(stats)["sq_norm"], list(range(ad.num_blocks)), m=5.0, lam=0.08)
            assert len(offsets) == ad.num_blocks and len(layer_alphas(model)) == ad.num_blocks


@pytest.mark.parametrize("method", ["bias", "optimal", "optimal_weights_only"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compensation_is_saved_where_the_family_can_hold_it(family: str, method: str, calib, tmp_path: Path) -> None:
    """Bias and optimal compensation reload in vanilla transformers where the adapter says the output projections
    hold a bias; elsewhere surgery refuses the bias with the reason (and --dry-run already did). Optimal
    compensation without a bias changes weights only and works on every family."""
    from transformers import AutoModelForCausalLM

    from prunelab.stages.arch import compensation_refusal
    from prunelab.stages.calibration.full import collect_stats
    from prunelab.stages.calibration.width import summary_tensors
    from prunelab.stages.surgery.apply import PlanError, apply_plan
    from prunelab.stages.surgery.compensation import bias_compensation, optimal_compensation
    from tests.test_width import _plan

    model = _family(family)
    stats = collect_stats(model, calib, {"activations", "hessian"}, progress=False)
    means = summary_tensors(stats)
    chosen = dict.fromkeys(range(3), UNITS["kv_group"][1] | {"mlp": [1, 9, 40]})
    if method == "bias":
        side = bias_compensation(model, chosen, means)
    else:
        side = optimal_compensation(model, chosen, means["gram"], 1e-2, method == "optimal")
    refusal = compensation_refusal(family) if method != "optimal_weights_only" else None
    if refusal:
        with pytest.raises(PlanError, match="without a bias"):
            apply_plan(model, _plan(model, chosen), side)
        return
    apply_plan(model, _plan(model, chosen), side)
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (fresh(calib).logits - model(calib).logits).abs().max().item() <= 1e-5


def test_phi3_fused_members_refuse_heterogeneous_widths() -> None:
    """Phi-3 splits its fused qkv_proj with the shared config's head counts: layers of different widths would
    split wrongly, so surgery refuses them before touching a weight."""
    from prunelab.stages.surgery.apply import PlanError, apply_plan
    from tests.test_width import _plan

    model = _family("phi3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="uniform allocation"):
        apply_plan(model, _plan(model, {1: UNITS["kv_group"][1]}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- coupling vs torch-pruning's graph
GRAPH_SKIPS = {
    "block": "a block is removed whole (the residual stream bypasses it): there is no channel group to resolve",
    "q_head": "the graph has no GQA pairing: SDPA's enable_gqa / repeat_kv is traced element-wise, so it pairs query "
              "channel c with key channel c instead of query heads (c // head_dim)·r … with key head c // head_dim; on "
              "a multi-head model a query head is a KV group. The exact masked == removed tests are the check",
}


def _graph_group(model, layer_index: int, kind: str, units: list[int]) -> dict[tuple[str, str], list[int]]:
    """torch-pruning's group for ``units`` of one layer, started from the adapter's first member, as
    {(path inside the layer, "out" | "in" | "norm"): sorted indices}; the graph's internal ops (reshape, concat …)
    and the per-head norms' broadcast weights (head_dim entries, which the graph indexes by projection channel) are
    left out. Traced with the family's rotary replaced by the identity (see test_width's head-coupling test: RoPE's
    rotate_half closes a cycle the group search never leaves; it mixes channels within a head only)."""
    import warnings

    tp = pytest.importorskip("torch_pruning")
    from prunelab.stages.arch import adapter_for

    ad = adapter_for(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": torch.randint(3, 200, (1, 8))},
                                                      output_transform=lambda out: out.logits)
    prefix = f"{ad.block_prefix(layer_index)}."
    modules = {m: n for n, m in model.named_modules()}
    params = {id(p): n.rsplit(".", 1)[0] for n, p in model.named_parameters()}
    layer, geo = ad.layers[layer_index], ad.geometry(ad.layers[layer_index])
    first = ad.members(kind)[0]
    found: dict[tuple[str, str], list[int]] = {}
    for dep, idxs in graph.get_pruning_group(layer.get_submodule(first.path), tp.prune_linear_out_channels,
                                             idxs=first.index(units, geo)):
        target = dep.target.module
        if isinstance(target, torch.nn.Linear):
            side = "out" if dep.handler == tp.prune_linear_out_channels else "in"
            found[(modules[target].removeprefix(prefix), side)] = sorted(int(x) for x in idxs)
        elif isinstance(target, torch.nn.Parameter):
            path = params[id(target)].removeprefix(prefix)
            if not (path in ad.HEAD_NORMS and target.numel() == geo.head_dim):  # per-head: not a projection's channel
                found[(path, "norm")] = sorted(int(x) for x in idxs)
    return found


def _graph_hidden_group(model, channels: list[int]) -> dict[str, list[int]]:
    """torch-pruning's group for hidden channels, started from the token embedding: {parameter name: indices} of
    every weight it cuts (a tied head is the embedding's weight)."""
    import warnings

    tp = pytest.importorskip("torch_pruning")
    from prunelab.stages.arch import adapter_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tp.DependencyGraph().build_dependency(model, example_inputs={"input_ids": torch.randint(3, 200, (1, 8))},
                                                      output_transform=lambda out: out.logits)
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, list[int]] = {}
    for dep, idxs in graph.get_pruning_group(adapter_for(model).embedding, tp.prune_embedding_out_channels, idxs=channels):
        target = dep.target.module
        weight = target if isinstance(target, torch.nn.Parameter) else getattr(target, "weight", None)
        if isinstance(weight, torch.nn.Parameter):
            found[names[id(weight)]] = sorted(int(x) for x in idxs)
    return found


@pytest.mark.parametrize("kind", ["block", *UNITS, "hidden_channel"])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_groups_equal_the_dependency_graph(family: str, kind: str, monkeypatch) -> None:
    """Issue 16 item 3: every width unit's members (module, axis, indices — fused row maps and OLMo 2's projection
    norms included) equal the group torch-pruning's DependencyGraph finds, on the family's tiny model made
    multi-head (kv_heads = heads, so the graph's element-wise view of attention is right) with the rotary traced as
    the identity. Where the graph cannot resolve a unit, the skip says why."""
    import importlib

    from prunelab.stages.arch import adapter_for
    from prunelab.stages.io.tiny import tiny_family

    if kind in GRAPH_SKIPS:
        pytest.skip(GRAPH_SKIPS[kind])
    model = tiny_family(family, num_layers=2, kv_heads=4)
    modeling = importlib.import_module(type(model).__module__)
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", lambda q, k, *args, **kwargs: (q, k))
    ad = adapter_for(model)
    if kind == "hidden_channel":  # every weight of the adapter's hidden members (embedding, head, norms, linears)
        channels = [3, 7, 40]
        assert _graph_hidden_group(model, channels) == {name: channels for name, _, _ in ad.hidden_members()
                                                        if name.endswith(".weight")}
        return
    units = {"kv_group": [1], "mlp_channel": [2, 5, 100]}[kind]
    for i in range(ad.num_blocks):
        geo = ad.geometry(ad.layers[i])
        want = {(m.path, m.axis): sorted(m.index(units, geo)) for m in ad.members(kind)}
        assert _graph_group(model, i, kind, units) == want


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phi3"])  # Phi-3: test_phi3_fused_members_refuse_…
def test_heterogeneous_widths_reload_through_the_prunelab_loader(family: str, calib, tmp_path: Path) -> None:
    """Layers of different widths (a non-uniform allocation) are saved with per-layer shapes; the prunelab loader
    rebuilds every layer through the adapter (OLMo 2's projection norms at their new widths too) and gives the same
    logits."""
    from prunelab.stages.io.loader import load_pruned
    from prunelab.stages.surgery.apply import apply_plan
    from tests.test_width import _plan

    model = _family(family)
    apply_plan(model, _plan(model, {0: UNITS["kv_group"][1], 1: UNITS["mlp_channel"][1]}))
    assert model.config.prunelab_layer_shapes
    model.save_pretrained(tmp_path)
    fresh = load_pruned(tmp_path).eval()
    with torch.no_grad():
        assert (fresh(calib).logits - model(calib).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_hidden_channels_keep_the_embedding_scale_exact(family: str, tie: bool, calib, tmp_path: Path) -> None:
    """Gemma multiplies embeddings by sqrt(hidden_size), which hidden-channel pruning lowers: the kept embedding
    weights take sqrt(d/d'), and a tied head's extra factor comes back out of the final norm's (1 + w) — masked ==
    removed, vanilla reload equal, tied or not."""

    from prunelab.stages.io.tiny import tiny_family

    model = tiny_family(family, num_layers=3, tie=tie)
    masked = copy.deepcopy(model)
    _prune(model, "hidden_channel", masked)
    assert model.get_input_embeddings().embed_scale.item() == pytest.approx(model.config.hidden_size**0.5)
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)


@pytest.mark.parametrize("kind", ["q_head", "kv_group", "hidden_channel"])
def test_olmo2_projection_norms_stay_exact_when_heads_go(kind: str, calib, tmp_path: Path) -> None:
    """OLMo 2's q_norm / k_norm divide by the RMS over every query / key channel, so removing heads changes the
    divisor: the norm's kept weights take sqrt(D/D') and the projection feeding it sqrt(D'/D), which also keeps ε
    exact (it is the config's one rms_norm_eps). With an ε as large as the activations' mean square, an ε left
    alone would show; removal still equals masking, and a vanilla reload gives the same logits."""

    from prunelab.stages.io.tiny import tiny_family

    model = tiny_family("olmo2", num_layers=3, rms_norm_eps=1e-2)
    masked = copy.deepcopy(model)
    _prune(model, kind, masked)
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)
