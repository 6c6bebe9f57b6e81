"""The recovery bench as rows of recipes: every row of the shipped spec valid, an iterative row's steps split over
its cycles, a malformed row refused by name, finished runs tabulated with their ratio to dense."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prunelab.benchmarks.spec import BenchError, load_bench
from prunelab.benchmarks.tables import recovery_lines, recovery_table

SPEC = Path("recipes/bench/smollm2-recovery.yaml")


def test_every_row_of_the_shipped_spec_is_a_valid_recipe() -> None:
    spec = yaml.safe_load(SPEC.read_text())
    bench = load_bench(SPEC)
    assert [r.name for r in bench.rows] == list(spec["rows"])
    for row, recipe in zip(bench.rows, bench.recipes()):
        raw = spec["rows"][row.name]
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
            assert rec.loop.max_steps == steps and (steps == spec["recover"]["loop"]["max_steps"] or row.name.endswith(f"-{steps}"))
            assert kinds.index("prune") < kinds.index("recover")
        else:
            assert "recover" not in kinds


def test_a_row_merges_its_recover_keys_over_the_shared_block(tmp_path: Path) -> None:
    spec = yaml.safe_load(SPEC.read_text())
    spec["rows"] = {"dense": {"dense": True}, "x": {"base": "flap-optimal", "recover": {"method": "full", "optimizer": {"lr": 1e-4}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    rec = load_bench(tmp_path / "r.yaml").rows[1].recipe["stages"]["recover"]
    assert rec["method"] == "full" and rec["optimizer"] == {"lr": 1e-4, "warmup_steps": 10} and rec["loss"] == "ce"


@pytest.mark.parametrize(("row", "needle"), [({"base": "nope"}, r"rows \['r'\]: base must be one of"),
                                             ({"base": "bi", "steps": 3}, r"rows\.r\.steps"),
                                             ({"base": "bi", "iterate": {"cycles": 2}}, r"rows\.r: iterate: write"),
                                             ({"base": "bi", "recover": {"loop": {"max_stpes": 3}}}, r"rows\[\d+\] 'r': .*max_stpes")])
def test_a_malformed_row_is_refused_by_name(tmp_path: Path, row: dict, needle: str) -> None:
    spec = yaml.safe_load(SPEC.read_text())
    spec["rows"]["r"] = row
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(BenchError, match=needle):
        load_bench(tmp_path / "r.yaml")


def test_summary_and_table() -> None:
    dense = {"wt": 10.0}
    m = {"model": {"params_before": 2e6, "params_after": 1.5e6},
         "eval": {"pruned": {"wt": {"ppl": 30.0}}, "recovered": {"wt": {"ppl": 15.0},
                                                                  "arc": {"acc": 0.5, "acc_stderr": 0.01, "acc_norm": 0.45}},
                  "control": {"wt": {"ppl": 9.0}}},
         "recover": {"pruned": {"steps": 100, "tokens_per_step": 1024, "tokens_per_s": 200.0,
                                "teacher": {"tokens_per_s_without_teacher": 260.0}},
                     "control": {"steps": 100, "tokens_per_step": 1024, "tokens_per_s": 180.0}}}
    rows = recovery_lines("r", m, dense)
    assert [(r["row"], r["label"], r["params"]) for r in rows] == [("r", "recovered", 1.5e6),
                                                                   ("r → dense control", "control", 2e6)]
    text = recovery_table(rows)
    assert "| r | 1.5M | 15.00 (1.50×) | 50.0 ± 1.0 / 45.0 | 100 × 1024 | 200.0 (260.0) |" in text
    assert "| r → dense control | 2.0M | 9.00 (0.90×) | – | 100 × 1024 | 180.0 |" in text
