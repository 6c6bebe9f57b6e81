"""The prune stage's typed settings (a union on `units`), their version-1 migration and hash, and the typed plan."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from prunelab.recipe import RecipeError, load_recipe, validate
from prunelab.registry import load_stages
from prunelab.stages.core.migrate import V1_DEFAULTS
from prunelab.stages.prune import BlocksPrune, PruneBase, prune_config
from prunelab.stages.surgery.plan import DepthPlan, HiddenPlan, PlanError, WidthPlan, load_plan, read_plan

ROOT = Path(__file__).resolve().parents[1]
PruneConfig = load_stages().get("prune").config_cls  # the union type (stages.prune.PruneConfig)

SCORE = {"blocks": {"type": "score", "criteria": ["ppl"]}, "width": {"type": "score", "units": "width"},
         "hidden": {"type": "score", "units": "width"}}
PRUNE = {"blocks": {"type": "prune", "criterion": "ppl", "num_blocks": 2},
         "width": {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.2},
         "hidden": {"type": "prune", "units": "hidden", "criterion": "taylor", "ratio": 0.2}}


def _recipe(units: str, /, **prune: object) -> dict:
    stage = {**PRUNE[units], **prune}
    return {"name": "p", "model": {"source": "tiny-random-llama"},
            "stages": {"calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 2,
                                     "seq_len": 16},
                       "score": SCORE[units], "prune": {k: v for k, v in stage.items() if v is not None}}}


def _prune(units: str, /, **prune: object):
    return validate(_recipe(units, **prune)).stages["prune"]


def _error(units: str, /, **prune: object) -> str:
    with pytest.raises(RecipeError) as exc:
        validate(_recipe(units, **prune))
    return str(exc.value)


# ----------------------------------------------------------------------------- one class per mode
def test_each_mode_is_its_own_class_with_only_its_settings():
    blocks, width, hidden = _prune("blocks"), _prune("width"), _prune("hidden")
    assert [type(c).__name__ for c in (blocks, width, hidden)] == ["BlocksPrune", "WidthPrune", "HiddenPrune"]
    assert all(isinstance(c, PruneBase) for c in (blocks, width, hidden))
    assert set(type(blocks).model_fields) == {"type", "units", "criterion", "num_blocks", "ratio", "rounding"}
    assert set(type(hidden).model_fields) == {"type", "units", "criterion", "ratio", "layer_ratio", "norm_rescale"}
    assert width.allocation.type == "uniform" and width.compensation.type == "none" and width.attention == "kv_group"
    assert _prune("blocks", units=None).units == "blocks"  # blocks is the default mode
    # the union is a type, not a class to instantiate: any field of that type, a TypeAdapter and prune_config agree
    raw = {"type": "prune", "criterion": "ppl", "num_blocks": 2}
    assert TypeAdapter(PruneConfig).validate_python(raw) == prune_config(raw) == BlocksPrune(**raw) == blocks


@pytest.mark.parametrize("units,key,value,expected", [
    ("blocks", "layer_ratio", 0.2, "layer_ratio, allocation and compensation are width settings; set units: width"),
    ("blocks", "allocation", "global", "layer_ratio, allocation and compensation are width settings; set units: width"),
    ("blocks", "compensation", "bias", "layer_ratio, allocation and compensation are width settings; set units: width"),
    ("blocks", "layers", [1, 3], "layers is a width setting; set units: width"),
    ("blocks", "attention", "q_head", "attention is a width setting; set units: width"),
    ("blocks", "mlp", False, "mlp is a width setting; set units: width"),
    ("blocks", "norm_rescale", False, "norm_rescale is a hidden-channel setting; set units: hidden"),
    ("width", "num_blocks", 2, "num_blocks is a depth target; for width give `ratio` or `layer_ratio`"),
    ("width", "rounding", "floor", "rounding is a blocks setting"),
    ("width", "norm_rescale", True, "norm_rescale is a hidden-channel setting; set units: hidden"),
    ("hidden", "num_blocks", 2, "num_blocks is a depth target"),
    ("hidden", "rounding", "ceil", "rounding is a blocks setting"),
    ("hidden", "allocation", "uniform", "hidden channels span every layer: allocation, layers and compensation do not apply"),
    ("hidden", "layers", [1, 3], "hidden channels span every layer: allocation, layers and compensation do not apply"),
    ("hidden", "compensation", "bias", "hidden channels span every layer: allocation, layers and compensation do not apply"),
    ("hidden", "attention", "none", "hidden channels are pruned on their own (LLM-Pruner's channel mode)"),
    ("hidden", "mlp", False, "hidden channels are pruned on their own (LLM-Pruner's channel mode)"),
])
def test_a_setting_of_another_mode_is_an_error_naming_it(units, key, value, expected):
    msg = _error(units, **{key: value})
    assert f"stages.prune.{key}: {expected}" in msg, msg


@pytest.mark.parametrize("prune,expected", [
    ({"units": "hidden", "criterion": "flap"}, "stages.prune: criterion 'flap' has no hidden-channel score"),
    ({"units": "width", "attention": "head_dim"}, "stages.prune.attention: head_dim never changes"),
    ({"units": "width", "attention": "heads"}, "attention 'heads': choose kv_group (whole GQA groups), q_head"),
    ({"units": "width", "allocation": "owll"}, "stages.prune.allocation: allocation 'owll': choose uniform | global | owl | alpha"),
    ({"units": "width", "allocation": {"type": "owl", "k": 3}}, "stages.prune.allocation.k: unknown key; allowed keys here: lambda, m, type"),
    ({"units": "width", "allocation": {"type": "alpha", "epsilon": 0.7}}, "stages.prune.allocation.epsilon"),
    ({"units": "width", "compensation": {"type": "bias", "damping": 0.1}}, "stages.prune.compensation.damping: unknown key"),
    ({"units": "width", "compensation": {"type": "optimal", "damping": 0}}, "stages.prune.compensation.damping"),
    ({"units": "deep"}, "stages.prune: units 'deep': choose blocks | width | hidden"),
    ({"units": "blocks", "num_blocs": 2}, "stages.prune.num_blocs: unknown key; did you mean 'num_blocks'?"),
], ids=["hidden flap", "head_dim", "attention", "allocation name", "owl key", "alpha range", "bias has no damping",
        "damping range", "units", "typo"])
def test_bad_settings_name_the_field_and_the_fix(prune, expected):
    msg = _error(prune["units"] if prune.get("units") in PRUNE else "blocks", **prune)
    assert expected in msg, msg


def test_short_spelling_is_the_type_with_its_defaults():
    short = _prune("width", allocation="global", compensation="optimal")
    long = _prune("width", allocation={"type": "global"}, compensation={"type": "optimal", "damping": 0.01, "bias": True})
    assert short == long
    owl = _prune("width", allocation={"type": "owl", "lambda": 0.1})
    assert (owl.allocation.m, owl.allocation.lambda_) == (5.0, 0.1)
    assert owl.model_dump(mode="json")["allocation"] == {"type": "owl", "m": 5.0, "lambda": 0.1}


# ----------------------------------------------------------------------------- version 1 keys migrate
@pytest.mark.parametrize("old,new", [
    ({"allocation": "owl", "owl_m": 3.0, "owl_lambda": 0.1}, {"allocation": {"type": "owl", "m": 3.0, "lambda": 0.1}}),
    ({"allocation": "owl", "owl_lambda": 0.05}, {"allocation": {"type": "owl", "lambda": 0.05}}),
    ({"allocation": "alpha", "alpha_epsilon": 0.15}, {"allocation": {"type": "alpha", "epsilon": 0.15}}),
    ({"compensation": "optimal", "damping": 0.1}, {"compensation": {"type": "optimal", "damping": 0.1}}),
    ({"compensation": "optimal", "optimal_bias": False}, {"compensation": {"type": "optimal", "bias": False}}),
    ({"hidden": False}, {}),
], ids=["owl", "owl lambda", "alpha", "damping", "optimal bias", "hidden false"])
def test_version_1_width_keys_migrate(old, new):
    assert _prune("width", **old) == _prune("width", **new)


def test_version_1_hidden_mode_migrates():
    old = _prune("width", criterion="taylor", hidden=True, attention="none", mlp=False, hidden_norm_rescale=False)
    assert old == _prune("hidden", norm_rescale=False) and type(old).__name__ == "HiddenPrune"


@pytest.mark.parametrize("units,old,expected", [
    ("width", {"owl_m": 3.0}, "stages.prune.owl_m: owl_m is the version-1 spelling of allocation: {type: owl, m: ...}"),
    ("width", {"allocation": "global", "alpha_epsilon": 0.1}, "alpha_epsilon is the version-1 spelling of allocation: {type: alpha"),
    ("width", {"compensation": "bias", "damping": 0.1}, "damping is the version-1 spelling of compensation: {type: optimal, damping"),
    ("blocks", {"optimal_bias": False}, "optimal_bias is the version-1 spelling of compensation: {type: optimal, bias: ...}"),
    ("width", {"hidden_norm_rescale": False}, "hidden_norm_rescale is the version-1 spelling of norm_rescale"),
    ("blocks", {"hidden": True}, "hidden: true is the version-1 spelling of units: hidden"),
    ("width", {"criterion": "taylor", "hidden": True, "mlp": True},
     "hidden channels are pruned on their own (LLM-Pruner's channel mode): set attention: none and mlp: false"),
    ("width", {"allocation": {"type": "owl", "m": 2.0}, "owl_m": 3.0}, "owl_m and allocation.m both given"),
], ids=["owl_m without owl", "epsilon without alpha", "damping without optimal", "blocks", "norm rescale", "hidden blocks",
        "hidden with mlp", "both spellings"])
def test_version_1_keys_that_do_not_apply_fail_with_the_new_spelling(units, old, expected):
    msg = _error(units, **old)
    assert expected in msg, msg


# ----------------------------------------------------------------------------- version 1 settings hash
V1_ORDER = list(V1_DEFAULTS)
# The flat class's dump at commit 0f1500b (``git show 0f1500b:stages/prune.py``) of each recipe shipped then, as the
# values that differ from its defaults (computed with that class on those recipes). Three in full below.
V1_DUMPS = {
    "recipes/alpha-flap-20.yaml": {"units": "width", "criterion": "flap", "ratio": 0.192, "allocation": "alpha", "compensation": "bias"},
    "recipes/angular-25.yaml": {"criterion": "angular_distance", "num_blocks": 8},
    "recipes/debug-recover.yaml": {"criterion": "block_influence", "num_blocks": 2},
    "recipes/debug-width.yaml": {"units": "width", "criterion": "flap", "ratio": 0.1, "allocation": "global", "compensation": "bias"},
    "recipes/debug.yaml": {"criterion": "ppl", "num_blocks": 2},
    "recipes/flap-20.yaml": {"units": "width", "criterion": "flap", "ratio": 0.192, "allocation": "global", "compensation": "bias"},
    "recipes/laco-25.yaml": {"criterion": "laco", "num_blocks": 10},
    "recipes/llm-pruner-20.yaml": {"units": "width", "criterion": "taylor", "layer_ratio": 0.25, "layers": [4, 30]},
    "recipes/optimal-comp-20.yaml": {"units": "width", "criterion": "flap", "ratio": 0.192, "allocation": "global",
                                     "compensation": "optimal"},
    "recipes/shortened-llama-20.yaml": {"criterion": "ppl", "ratio": 0.2, "rounding": "floor"},
    "recipes/shortgpt-25.yaml": {"criterion": "block_influence", "num_blocks": 8},
    "recipes/sleb-20.yaml": {"criterion": "sleb", "num_blocks": 6},
    "recipes/smollm2/alpha-flap-20.yaml": {"units": "width", "criterion": "flap", "ratio": 0.2, "allocation": "alpha",
                                           "compensation": "bias"},
    "recipes/smollm2/angular-25.yaml": {"criterion": "angular_distance", "num_blocks": 8},
    "recipes/smollm2/flap-20.yaml": {"units": "width", "criterion": "flap", "ratio": 0.2, "allocation": "global", "compensation": "bias"},
    "recipes/smollm2/laco-20.yaml": {"criterion": "laco", "ratio": 0.2},
    # shipped then as recipes/smollm2/llm-pruner-20.yaml (renamed; that name now holds the official options)
    "recipes/smollm2/llm-pruner-units-20.yaml": {"units": "width", "criterion": "taylor", "ratio": 0.2, "layers": [4, 28]},
    "recipes/smollm2/llm-pruner-channel-20.yaml": {"units": "width", "criterion": "taylor", "ratio": 0.2, "attention": "none",
                                                   "mlp": False, "hidden": True},
    "recipes/smollm2/optimal-comp-20.yaml": {"units": "width", "criterion": "flap", "ratio": 0.2, "allocation": "global",
                                             "compensation": "optimal"},
    "recipes/smollm2/recover-6blocks.yaml": {"criterion": "block_influence", "num_blocks": 6},
    "recipes/smollm2/shortened-llama-20.yaml": {"criterion": "ppl", "ratio": 0.2, "rounding": "floor"},
    "recipes/smollm2/shortgpt-25.yaml": {"criterion": "block_influence", "num_blocks": 8},
    "recipes/smollm2/shortgpt-6blocks.yaml": {"criterion": "block_influence", "num_blocks": 6},
    "recipes/smollm2/sleb-20.yaml": {"criterion": "sleb", "num_blocks": 6},
    "recipes/smollm2/wanda-sp-20.yaml": {"units": "width", "criterion": "wanda_sp", "ratio": 0.2},
    "recipes/wanda-sp-20.yaml": {"units": "width", "criterion": "wanda_sp", "layer_ratio": 0.2},
}
FULL = {  # three old dumps written out in full, as the old class gave them (field order included)
    "recipes/debug-width.yaml": {
        "type": "prune", "units": "width", "criterion": "flap", "num_blocks": None, "ratio": 0.1, "rounding": "nearest",
        "layer_ratio": None, "allocation": "global", "alpha_epsilon": 0.08, "owl_m": 5.0, "owl_lambda": 0.08, "layers": None,
        "attention": "kv_group", "mlp": True, "hidden": False, "hidden_norm_rescale": True, "compensation": "bias",
        "damping": 0.01, "optimal_bias": True},
    "recipes/smollm2/shortened-llama-20.yaml": {
        "type": "prune", "units": "blocks", "criterion": "ppl", "num_blocks": None, "ratio": 0.2, "rounding": "floor",
        "layer_ratio": None, "allocation": "uniform", "alpha_epsilon": 0.08, "owl_m": 5.0, "owl_lambda": 0.08, "layers": None,
        "attention": "kv_group", "mlp": True, "hidden": False, "hidden_norm_rescale": True, "compensation": "none",
        "damping": 0.01, "optimal_bias": True},
    "recipes/smollm2/llm-pruner-channel-20.yaml": {
        "type": "prune", "units": "width", "criterion": "taylor", "num_blocks": None, "ratio": 0.2, "rounding": "nearest",
        "layer_ratio": None, "allocation": "uniform", "alpha_epsilon": 0.08, "owl_m": 5.0, "owl_lambda": 0.08, "layers": None,
        "attention": "none", "mlp": False, "hidden": True, "hidden_norm_rescale": True, "compensation": "none",
        "damping": 0.01, "optimal_bias": True},
}


def _shipped_prune(path: str):
    recipe = load_recipe(ROOT / path)
    return next(c for c in recipe.stages.values() if c.type == "prune")


@pytest.mark.parametrize("path", sorted(V1_DUMPS))
def test_v1_settings_are_the_old_flat_dump_of_each_shipped_recipe(path):
    expected = {k: V1_DUMPS[path].get(k, V1_DEFAULTS[k]) for k in V1_ORDER}
    got = _shipped_prune(path).v1_settings()
    assert got == expected and list(got) == V1_ORDER
    assert json.dumps(got) == json.dumps(expected)  # the hash input, floats and lists included
    if path in FULL:
        assert got == FULL[path] and list(got) == list(FULL[path])
    # an old dump (a version-1 recipe.resolved.yaml) validates to the same settings again
    again = prune_config(got)
    assert again == _shipped_prune(path) and again.v1_settings() == got


def test_v1_settings_keep_non_default_settings():
    cfg = _prune("width", layer_ratio=0.3, ratio=None, allocation={"type": "owl", "m": 7, "lambda": 0.1}, attention="q_head",
                 layers=[2, 5], compensation={"type": "optimal", "damping": 0.05, "bias": False}, mlp=False)
    v1 = cfg.v1_settings()
    assert (v1["owl_m"], v1["owl_lambda"], v1["damping"], v1["optimal_bias"], v1["layers"]) == (7.0, 0.1, 0.05, False, [2, 5])
    assert prune_config(v1) == cfg
    hidden = _prune("hidden", layer_ratio=0.1, ratio=None, norm_rescale=False).v1_settings()
    assert (hidden["units"], hidden["hidden"], hidden["hidden_norm_rescale"], hidden["mlp"]) == ("width", True, False, False)


def test_validating_a_width_recipe_stays_torch_free():
    code = ("import sys; from prunelab.recipe import load_recipe; load_recipe('recipes/smollm2/optimal-comp-20.yaml'); "
            "load_recipe('recipes/smollm2/llm-pruner-channel-20.yaml'); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- the typed plan
V1_RUNS = ROOT / "tests" / "fixtures" / "v1-runs"
OLD_HIDDEN_PLAN = {  # a hidden-channel plan.json as version 1 wrote it (kind width, a `hidden` section)
    "kind": "width", "criterion": "taylor",
    "target": {"ratio": 0.2, "layer_ratio": None, "hidden": True, "norm_rescale": True},
    "layers": {}, "hidden": {"removed": [3, 9, 17, 30], "hidden_before": 64, "hidden_after": 60, "norm_rescale": True},
    "shapes_before": [{"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}] * 2,
    "shapes_after": [{"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}] * 2,
    "uniform": True, "num_removed": 4, "layers_before": 2, "layers_after": 2, "params_before": 40000, "side_file": None,
    "params_after": 38000, "achieved_ratio": 0.05,
}


@pytest.mark.parametrize("name,kind", [("debug", DepthPlan), ("debug-width", WidthPlan)])
def test_old_plan_json_loads_and_round_trips(name, kind):
    old = json.loads(next((V1_RUNS / name).glob("*-prune/plan.json")).read_text())
    plan = load_plan(old)
    assert type(plan) is kind and plan.version == 2
    again = load_plan(json.loads(json.dumps(plan.to_json())))
    assert again == plan and again.to_json() == plan.to_json()
    new = plan.to_json()
    assert list(new)[:4] == ["kind", "version", "criterion", "target"]
    assert {k: v for k, v in new.items() if k in old and k != "target"} == {k: v for k, v in old.items() if k != "target"}
    assert plan.metrics() == {"kind": old["kind"], "criterion": old["criterion"], "removed_blocks": old.get("removed_blocks", []),
                              "removed_units": old["num_removed"], "achieved_ratio": old["achieved_ratio"]}


def test_old_hidden_plan_loads_as_a_hidden_plan():
    plan = load_plan(copy.deepcopy(OLD_HIDDEN_PLAN))
    assert isinstance(plan, HiddenPlan) and plan.kind == "hidden" and plan.hidden.removed == [3, 9, 17, 30]
    assert plan.target.norm_rescale and "layers" not in plan.to_json()
    assert load_plan(plan.to_json()) == plan
    assert "hidden_size 64 → 60" in plan.describe()


def test_plan_errors():
    with pytest.raises(PlanError, match="unknown plan kind 'sideways'"):
        load_plan({"kind": "sideways"})
    with pytest.raises(PlanError, match="not a valid depth plan"):
        load_plan({"kind": "depth", "removed_blocks": "two"})
    old_optimal = {"kind": "width", "layers": {}, "shapes_after": [], "target": {"compensation": "optimal", "damping": 0.05,
                                                                                    "optimal_bias": False}}
    assert load_plan(old_optimal).target.compensation.model_dump() == {"type": "optimal", "damping": 0.05, "bias": False}


def test_describe_is_markdown_safe_and_says_what_was_removed():
    depth = DepthPlan(criterion="laco", removed_blocks=[3, 4], merges=[{"into": 2, "from": [3, 4]}], layers_before=6,
                      achieved_ratio=0.25, num_removed=2)
    text = depth.describe()
    assert "`laco`" in text and "[3, 4]" in text and "2 of 6 blocks, 25.00% of all parameters" in text and "block 2 ← [3, 4]" in text
    assert "](" not in text and "|" not in text and "\n" not in text
    old = json.loads(next((V1_RUNS / "debug-width").glob("*-prune/plan.json")).read_text())
    width = load_plan(old).describe()
    assert "`flap`" in width and "global allocation" in width and "bias compensation" in width and "layer widths differ" in width


@pytest.mark.parametrize("recipe", ["recipes/debug-width.yaml"])
def test_describe_is_the_plan_in_the_cli_summary_report_and_model_card(recipe, tmp_path, capsys):
    from prunelab.run import main

    assert main([recipe, "--output-dir", str(tmp_path), "--no-progress"]) == 0
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    plan = read_plan(run)
    text = plan.describe()
    assert text in capsys.readouterr().out
    assert text in (run / "report.md").read_text()
    card = (run / "model" / "README.md").read_text()
    assert text in card and "| layer | query heads | KV heads | MLP channels |" in card
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["plan"] == plan.metrics() and set(metrics["plan"]) == {"kind", "criterion", "removed_blocks",
                                                                           "removed_units", "achieved_ratio"}
