"""Recovery's accelerate trackers (``loop.log_with``): every step's loss reaches the tracker, bad names are refused
at validation with the fix, and a recipe without trackers is unchanged."""

from __future__ import annotations

import importlib.util

import pytest
from accelerate.tracking import GeneralTracker


class MemoryTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is given (no package, no network)."""

    name = "memory"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []
        self.config: dict | None = None
        self.finished = False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = dict(values)

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_every_step_reaches_the_tracker(tmp_path, monkeypatch):
    from prunelab.stages.io.tiny import tiny_llama
    from prunelab.stages.recovery import trackers
    from prunelab.stages.recovery.config import RecoverySettings
    from prunelab.stages.recovery.trainer import recover_model
    from test_distill import DATA, _env

    mem = MemoryTracker()
    monkeypatch.setitem(trackers.TRACKERS, "memory", ("json",))
    monkeypatch.setattr("accelerate.tracking.filter_trackers", lambda names, logging_dir=None: [mem])
    cfg = RecoverySettings(data=DATA, lora={"dropout": 0.0}, optimizer={"lr": 3e-3},
                           loop={"batch_size": 4, "micro_batch_size": 2, "max_steps": 5, "log_with": ["memory"]})
    env = _env()
    info = recover_model(env, cfg, tiny_llama(num_layers=2), tmp_path, "pruned")
    assert [step for step, _ in mem.logged] == [1, 2, 3, 4, 5]
    assert mem.logged[0][1]["lr"] > 0 and all(v["lr"] >= 0 and v["tokens"] > 0 for _, v in mem.logged)
    assert mem.config["method"] == "lora" and mem.finished and info["steps"] == 5


def test_bad_tracker_names_are_refused_with_the_fix():
    from prunelab.stages.recovery.trackers import tracker_problems

    assert tracker_problems([]) == []
    assert "unknown tracker 'tensorbord'" in tracker_problems(["tensorbord"])[0]
    if importlib.util.find_spec("wandb") is None:
        assert "pip install wandb" in tracker_problems(["wandb"])[0]
    from prunelab.stages.recovery.config import RecoverySettings
    from test_distill import DATA

    with pytest.raises(ValueError, match="log_with: unknown tracker"):
        RecoverySettings(data=DATA, loop={"log_with": ["nope"]})
    plain = RecoverySettings(data=DATA)
    assert "log_with" not in str(plain.model_dump())  # left out at its default: old runs keep their hashes
