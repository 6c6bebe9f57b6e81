"""The recovery bench builds valid recipes (every row of the shipped spec), splits an iterative row's steps over
its cycles, refuses a malformed row by name, and tabulates finished runs with their ratio to dense."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prunelab.bench_calibration import _base
from prunelab.bench_recovery import previous_rows, row_recipe, summarize, table
from prunelab.recipe import validate

SPEC = Path("recipes/bench/smollm2-recovery.yaml")


def _spec() -> tuple[dict, dict]:
    spec = yaml.safe_load(SPEC.read_text())
    return spec, {b: _base(e) for b, e in spec["bases"].items()}


@pytest.mark.parametrize("row", list(yaml.safe_load(SPEC.read_text())["rows"]))
def test_every_row_of_the_shipped_spec_is_a_valid_recipe(row: str) -> None:
    spec, bases = _spec()
    raw = spec["rows"][row]
    recipe = validate(row_recipe(row, raw, bases, spec["recover"], spec.get("evaluation")))
    kinds = [c.type for c in recipe.stages.values()]
    assert kinds[-1] == "evaluate" and kinds.count("evaluate") == 1 and "export" not in kinds
    if raw.get("dense"):
        assert kinds == ["evaluate"]
    elif "iterate" in raw:
        it = recipe.stages["iterate"]
        assert "prune" not in kinds and "recover" not in kinds
        assert it.recover.loop.max_steps * it.cycles == spec["recover"]["loop"]["max_steps"]
    elif "recover" in raw:
        rec = recipe.stages["recover"]
        # same steps × tokens for every row, unless the row says its own (its name then says so: ...-300)
        steps = raw["recover"].get("loop", {}).get("max_steps", spec["recover"]["loop"]["max_steps"])
        assert rec.loop.max_steps == steps and (steps == spec["recover"]["loop"]["max_steps"] or row.endswith(f"-{steps}"))
        assert kinds.index("prune") < kinds.index("recover")
    else:
        assert "recover" not in kinds


def test_a_row_merges_its_recover_keys_over_the_shared_block() -> None:
    spec, bases = _spec()
    r = row_recipe("x", {"base": "flap-optimal", "recover": {"method": "full", "optimizer": {"lr": 1e-4}}}, bases,
                   spec["recover"], None)
    rec = r["stages"]["recover"]
    assert rec["method"] == "full" and rec["optimizer"] == {"lr": 1e-4, "warmup_steps": 10}
    assert spec["recover"]["method"] == "lora"  # the shared block is not modified


@pytest.mark.parametrize(("row", "needle"), [({"base": "nope"}, "base must be one of"),
                                             ({"base": "bi", "steps": 3}, "unknown keys ['steps']"),
                                             ({"base": "bi", "iterate": {"cycles": 2}}, "iterate needs a recover")])
def test_a_malformed_row_is_refused_by_name(row: dict, needle: str) -> None:
    spec, bases = _spec()
    with pytest.raises(SystemExit, match=r"row 'r'.*" + needle.replace("[", r"\[").replace("]", r"\]")):
        row_recipe("r", row, bases, spec["recover"], None)


def test_summary_and_table() -> None:
    dense = {"wt": {"ppl": 10.0}}
    m = {"model": {"params_before": 2e6, "params_after": 1.5e6},
         "eval": {"pruned": {"wt": {"ppl": 30.0}}, "recovered": {"wt": {"ppl": 15.0},
                                                                  "arc": {"acc": 0.5, "acc_stderr": 0.01, "acc_norm": 0.45}},
                  "control": {"wt": {"ppl": 9.0}}},
         "recover": {"pruned": {"steps": 100, "tokens_per_step": 1024, "tokens_per_s": 200.0,
                                "teacher": {"tokens_per_s_without_teacher": 260.0}},
                     "control": {"steps": 100, "tokens_per_step": 1024, "tokens_per_s": 180.0}}}
    rows = summarize("r", m, dense)
    assert [(r["row"], r["label"], r["params"]) for r in rows] == [("r", "recovered", 1.5e6),
                                                                   ("r → dense control", "control", 2e6)]
    text = table(rows)
    assert "| r | 1.5M | 15.00 (1.50×) | 50.0 ± 1.0 / 45.0 | 100 × 1024 | 200.0 (260.0) |" in text
    assert "| r → dense control | 2.0M | 9.00 (0.90×) | – | 100 × 1024 | 180.0 |" in text


def test_previous_rows_are_reused_only_when_their_definition_is_unchanged() -> None:
    """--previous: an old row counts only if its entry, base, shared recover block and evaluation are the same."""
    import copy

    spec, _ = _spec()
    line = {"row": "flap-optimal--lora-kd", "ppl": {"wt": 20.0}}
    old = {"spec": copy.deepcopy(spec), "rows": [{"row": "dense", "ppl": {"wt": 10.0}}, line,
                                                  {"row": "flap-optimal--lora-ce-control → dense control", "ppl": {"wt": 9.0}},
                                                  {"row": "gone", "ppl": {"wt": 1.0}}]}
    got = previous_rows(spec, old, "old.json")
    assert sorted(got) == ["dense", "flap-optimal--lora-ce-control", "flap-optimal--lora-kd"]
    assert got["flap-optimal--lora-kd"] == [{**line, "from": "old.json"}]
    changed = copy.deepcopy(spec)
    changed["recover"]["loop"]["max_steps"] = 300  # every recovered row trains differently now: only dense stays
    assert sorted(previous_rows(changed, old, "old.json")) == ["dense"]
    changed = copy.deepcopy(spec)
    changed["bases"]["flap-optimal"] = "recipes/smollm2/flap-20.yaml"
    assert "flap-optimal--lora-kd" not in previous_rows(changed, old, "old.json")
    changed = copy.deepcopy(spec)
    changed["rows"]["flap-optimal--lora-kd"] = {"base": "flap-optimal", "recover": {"loss": "kd", "lr": 1.0}}
    assert "flap-optimal--lora-kd" not in previous_rows(changed, old, "old.json")
