"""``--resume`` and the settings that do not change a result (``NOT_HASHED``, ``prunelab.stages.core.config``).

A streamed run's ``model.memory_budget_gb`` / ``offload_dir`` say only where the offloaded evaluation keeps the
weights (``prunelab.stages.io.offload``); before, they entered the load stage's hash, so a new evaluation budget
re-ran calibration, scoring, pruning and export under ``--resume``. Now they are left out of the hash (and only
out of the hash: the stages still read them), while a setting that does change the result still re-runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import prunelab
from prunelab.stages.core.config import HASH_CONTEXT
from prunelab.stages.io.config import ModelConfig
from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "tests" / "data" / "tiny_corpus.txt")
PPL = {"tiny": {"source": {"path": CORPUS}, "seq_len": 32, "max_tokens": 128, "batch_size": 2}}


def _recipe(source: Path, model: dict[str, Any], batch_size: int = 1) -> dict[str, Any]:
    return {"name": "resume", "model": {"source": str(source), "load": "streaming", **model}, "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": CORPUS}, "num_samples": 4, "seq_len": 32,
                      "pipeline": {"type": "sequential"}},
        "score": {"type": "score", "criteria": ["block_influence"], "batch_size": batch_size},
        "prune": {"type": "prune", "criterion": "block_influence", "num_blocks": 1},
        "export": {"type": "export", "shard_mb": 0.2},
        "pruned": {"type": "evaluate", "perplexity": PPL}}}


def _finished(run_dir: Path) -> dict[str, str]:
    """Each stage's finishing time and done.json mtime: unchanged exactly when the stage was restored."""
    return {p.parent.name: json.loads(p.read_text())["finished"] + str(p.stat().st_mtime_ns)
            for p in sorted(run_dir.glob("*/done.json"))}


def test_not_hashed_fields_leave_only_the_hash() -> None:
    cfg = ModelConfig(source="x", load="offload", memory_budget_gb=2.0, offload_dir="/tmp/o")
    assert "memory_budget_gb" in cfg.model_dump(mode="json")  # recipe.json and the stages still see them
    assert {"memory_budget_gb", "offload_dir"}.isdisjoint(cfg.model_dump(mode="json", context=HASH_CONTEXT))
    assert cfg.model_dump(mode="json", context=HASH_CONTEXT)["load"] == "offload"


def test_resume_with_another_evaluation_budget_restores_the_run(tmp_path: Path) -> None:
    folder = tmp_path / "dense"
    tiny_llama(num_layers=4, heads=4, kv_heads=2, tie=False, seed=3).save_pretrained(folder, max_shard_size="150KB")
    byte_tokenizer().save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
    out = tmp_path / "runs"
    prunelab.run(_recipe(folder, {"memory_budget_gb": 0.5 * size}), output_dir=out)
    run_dir = out / "resume"
    before = _finished(run_dir)
    later = [k for k in before if not k.endswith("-load")]
    assert {"02-calibrate", "03-score", "04-prune", "05-export", "06-pruned"} <= set(later)
    prunelab.run(_recipe(folder, {"memory_budget_gb": 0.8 * size, "offload_dir": str(tmp_path / "off")}),
                         output_dir=out, resume=True)
    after = _finished(run_dir)
    assert {k: after[k] for k in later} == {k: before[k] for k in later}  # every stage after load restored
    # a setting that changes the result still re-runs its stage and those after it
    prunelab.run(_recipe(folder, {"memory_budget_gb": 0.8 * size}, batch_size=2), output_dir=out, resume=True)
    rerun = _finished(run_dir)
    assert rerun["02-calibrate"] == after["02-calibrate"]
    assert all(rerun[k] != after[k] for k in ("03-score", "04-prune", "05-export", "06-pruned"))


@pytest.mark.parametrize("field", ["memory_budget_gb", "offload_dir"])
def test_a_not_hashed_field_is_still_validated_and_read(field: str) -> None:
    """Leaving a field out of the hash is not leaving it out of the config: resident runs still refuse it."""
    with pytest.raises(ValueError, match=field):
        ModelConfig(source="x", **{field: 2.0 if field == "memory_budget_gb" else "/tmp/o"})
