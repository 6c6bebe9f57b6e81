"""The recover stage's grouped settings: keys in their groups, a key in the wrong group named, every flat key of
version 1 migrated into its group, and the version-1 dump given back exactly (run directories and checkpoints made
before the groups resume). No training: milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunelab.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/debug-recover.yaml"
SHIPPED = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml") if "type: recover" in p.read_text())

# What the flat RecoverConfig of version 1 (commit 0f1500b) dumped for recipes/debug-recover.yaml, key for key, in order.
DEBUG_RECOVER_V1 = {
    "type": "recover", "method": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "data": {"source": {"dataset": None, "config": None, "split": "train", "data_files": None,
                        "path": "tests/data/tiny_corpus.txt", "text_field": "text", "join": "\n\n"},
             "format": "text", "seq_len": 64, "max_samples": 64, "train_on_inputs": False, "shuffle": True},
    "batch_size": 8, "micro_batch_size": 2, "max_steps": 6, "epochs": 1.0, "lr": 0.001, "scheduler": "linear",
    "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "gradient_checkpointing": False, "dtype": "auto",
    "save_every": 3, "keep_checkpoints": 2, "log_every": 10, "control": True, "compare_plain_steps": 0,
    "record_samples": True,
}
# recipes/smollm2/recover-6blocks.yaml, the same way (data omitted: it is unchanged).
RECOVER_6BLOCKS_V1 = {
    "type": "recover", "method": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "batch_size": 4, "micro_batch_size": 4, "max_steps": 150, "epochs": 1.0, "lr": 0.003, "scheduler": "linear",
    "warmup_steps": 10, "weight_decay": 0.0, "max_grad_norm": 1.0, "gradient_checkpointing": False, "dtype": "auto",
    "save_every": 50, "keep_checkpoints": 2, "log_every": 10, "control": True, "compare_plain_steps": 8,
    "record_samples": True,
}
# A value for every flat key, valid beside debug-recover's other settings.
FLAT_VALUES = {
    "rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "lr": 0.01, "scheduler": "cosine",
    "warmup_steps": 3, "weight_decay": 0.1, "max_grad_norm": 0.5, "batch_size": 16, "micro_batch_size": 4,
    "max_steps": 3, "epochs": 2.0, "gradient_checkpointing": True, "log_every": 5, "record_samples": False,
    "save_every": 7, "keep_checkpoints": 3,
}


def _recover(overrides: list[str] | None = None, path: str = RECIPE):
    return load_recipe(path, overrides).stages["recover"]


def test_settings_are_grouped():
    cfg = _recover()
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optimizer.lr, cfg.checkpoint.save_every) == (8, 16.0, 1e-3, 3)
    assert (cfg.loop.batch_size, cfg.loop.micro_batch_size, cfg.loop.max_steps) == (8, 2, 6)
    assert (cfg.method, cfg.loss.type, cfg.control, cfg.accumulation(2)) == ("lora", "ce", True, 2)


@pytest.mark.parametrize("override, needle", [
    ("stages.recover.loop.lr=0.1", "stages.recover: loop.lr: `lr` does not belong in `loop`; write optimizer.lr"),
    ("stages.recover.optimizer.keep_checkpoints=3",
     "optimizer.keep_checkpoints: `keep_checkpoints` does not belong in `optimizer`; write checkpoint.keep"),
    ("stages.recover.lora.method=qlora", "lora.method: `method` does not belong in `lora`; write it at the top of the stage"),
    ("stages.recover.lora.rnk=4", "stages.recover.lora.rnk: unknown key; did you mean 'rank'?"),
    ("stages.recover.epoch=2", "stages.recover.epoch: unknown key"),
])
def test_a_misplaced_key_is_an_error_naming_it(override, needle):
    with pytest.raises(RecipeError) as err:
        _recover([override])
    assert needle in str(err.value)


def test_every_version_1_key_migrates_or_kept_its_place():
    from prunelab.stages.recover import RecoverConfig
    from prunelab.stages.recovery.config import FLAT_KEYS, V1_ORDER

    assert set(FLAT_KEYS) == set(FLAT_VALUES)
    kept = [k for k in V1_ORDER if k not in FLAT_KEYS]
    assert kept == ["type", "method", "data", "dtype", "control", "compare_plain_steps"]
    assert all(k in RecoverConfig.model_fields for k in kept)


@pytest.mark.parametrize("old", sorted(FLAT_VALUES))
def test_each_flat_key_moves_into_its_group(old):
    """The old spelling as a command-line override of the grouped recipe: it lands in its group and wins."""
    from prunelab.stages.recovery.config import FLAT_KEYS

    group, key = FLAT_KEYS[old]
    value = FLAT_VALUES[old]
    text = json.dumps(value).replace('"', "") if isinstance(value, list) else str(value).lower()
    cfg = _recover([f"stages.recover.{old}={text}"])
    assert getattr(getattr(cfg, group), key) == value
    assert cfg.v1_settings()[old] == value


def test_a_whole_flat_recipe_validates_to_the_grouped_one():
    from prunelab.stages.recover import RecoverConfig

    grouped = _recover()
    assert RecoverConfig.model_validate(DEBUG_RECOVER_V1) == grouped
    flat_in_python = RecoverConfig(type="recover", data=DEBUG_RECOVER_V1["data"], rank=8, lr=1e-3, batch_size=8,
                                   micro_batch_size=2, max_steps=6, save_every=3, control=True)
    assert flat_in_python == grouped


def test_v1_settings_reproduce_the_old_dump():
    assert list(_recover().v1_settings().items()) == list(DEBUG_RECOVER_V1.items())
    six = _recover(path="recipes/smollm2/recover-6blocks.yaml").v1_settings()
    assert list(six) == list(DEBUG_RECOVER_V1)
    assert {k: v for k, v in six.items() if k != "data"} == RECOVER_6BLOCKS_V1


def test_the_version_1_run_fixture_has_the_same_settings():
    """The run directory made by version 1 hashed exactly this dump (tests/test_layout.py resumes it)."""
    import yaml

    from prunelab.stages.recover import RecoverConfig

    resolved = yaml.safe_load((ROOT / "tests/fixtures/v1-runs/debug-recover/recipe.resolved.yaml").read_text())
    old = resolved["stages"]["recover"]
    assert list(RecoverConfig.model_validate(old).v1_settings().items()) == list(old.items())


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_recipes_are_grouped_and_round_trip(path):
    import yaml

    from prunelab.stages.recover import RecoverConfig
    from prunelab.stages.recovery.config import FLAT_KEYS, V1_ABSENT, V1_ORDER

    raw = next(s for s in yaml.safe_load((ROOT / path).read_text())["stages"].values() if s.get("type") == "recover")
    assert not set(raw) & set(FLAT_KEYS), f"{path}: write the recover settings in their groups"
    cfg = _recover(path=path)
    v1 = cfg.v1_settings()
    # Settings version 1 could not say (loss kd, ...) come after its keys, so they never share its hash.
    assert tuple(v1)[:len(V1_ORDER)] == V1_ORDER and set(tuple(v1)[len(V1_ORDER):]) <= set(V1_ABSENT)
    assert RecoverConfig.model_validate(v1) == cfg


def test_checkpoints_of_version_1_are_found_by_their_hash():
    """A checkpoint written before the groups carries sha256(flat model_dump_json | label | processes)."""
    from prunelab.stages.recovery.checkpoints import settings_hashes

    new, v1 = settings_hashes(_recover(), "pruned", 1)
    assert v1 == "2a660803a33dac38"  # computed by the flat RecoverConfig of commit 0f1500b
    assert new != v1
