"""Training checkpoints for ``--resume``: ``accelerator.save_state`` of the trainable (adapter) weights plus
optimizer, scheduler and RNG states, and a ``trainer_state.json`` with the step, the loss curve and the
samples consumed so far.

A checkpoint is filed under a hash of the settings, the label and the number of processes; only one
with the same hash is resumed from. Each save goes to ``step-N.tmp`` and is renamed when whole, so a
killed job never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydantic_core
from accelerate.utils import DistributedType

from prunelab.stages.core.files import atomic_write_json
from prunelab.stages.recovery.config import CheckpointSettings
from prunelab.stages.recovery.model import trainable_only

TRAIN_STATE = "trainer_state.json"


def settings_hashes(cfg: Any, label: str, processes: int) -> list[str]:
    """The hash new checkpoints carry, then the one a checkpoint made before the grouped settings carries
    (the same settings in the version-1 flat dump, when the config can give it), so those still resume."""
    texts = [cfg.model_dump_json()]
    v1 = getattr(cfg, "v1_settings", None)
    if v1 is not None:
        texts.append(pydantic_core.to_json(v1()).decode())
    return [hashlib.sha256(f"{text}|{label}|{processes}".encode()).hexdigest()[:16] for text in texts]


class Checkpoints:
    """The ``checkpoints/`` folder of one training (one label)."""

    def __init__(self, acc: Any, folder: Path, hashes: list[str], settings: CheckpointSettings) -> None:
        self.acc, self.folder, self.hashes, self.settings = acc, folder, hashes, settings

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest whole checkpoint made with these settings, and its trainer state."""
        found = []
        for ckpt in self.folder.glob("step-*"):
            state_file = ckpt / TRAIN_STATE
            if ckpt.is_dir() and state_file.is_file():
                state = json.loads(state_file.read_text())
                if state.get("config_hash") in self.hashes:
                    found.append((state["step"], ckpt, state))
        if not found:
            return None
        _, ckpt, state = max(found, key=lambda t: t[0])
        return ckpt, state

    def load(self, ckpt: Path, state: dict[str, Any], scheduler: Any) -> None:
        """Adapter, optimizer and RNG states into the prepared objects; the scheduler from the trainer state."""
        self.acc.load_state(str(ckpt), **self._load_kwargs())
        scheduler.load_state_dict(state["scheduler"])

    def due(self, step: int, total: int) -> bool:
        every = self.settings.save_every
        return bool(every) and step % every == 0 and step < total

    def save(self, step: int, scheduler: Any, losses: list[float], samples: list[list[int]]) -> None:
        """save_state into ``step-N.tmp`` then rename; keep the newest ``keep``."""
        acc = self.acc
        final, tmp = self.folder / f"step-{step}", self.folder / f"step-{step}.tmp"
        kwargs = {"exclude_frozen_parameters": True} if acc.distributed_type == DistributedType.DEEPSPEED else {}
        tmp.mkdir(parents=True, exist_ok=True)  # every rank writes its RNG state (and ZeRO shards) here
        acc.save_state(str(tmp), **kwargs)
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / TRAIN_STATE, {"step": step, "config_hash": self.hashes[0], "scheduler": scheduler.state_dict(),
                                                  "losses": losses, "samples": samples})
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        acc.wait_for_everyone()

    def _prune(self) -> None:
        old = sorted((p for p in self.folder.glob("step-*") if p.suffix != ".tmp"), key=lambda p: int(p.name.split("-")[1]))
        for p in old[:-self.settings.keep]:
            shutil.rmtree(p, ignore_errors=True)

    @contextmanager
    def adapter_only(self) -> Iterator[None]:
        """While open, ``save_state`` writes only the trainable tensors of each model, not the frozen base."""
        acc = self.acc
        hook = acc.register_save_state_pre_hook(lambda models, weights, _dir: weights.__setitem__(
            slice(None), [trainable_only(acc.unwrap_model(m)) for m in models]))
        try:
            yield
        finally:
            hook.remove()

    def _load_kwargs(self) -> dict[str, Any]:
        """Checkpoints hold only the adapter: tell the loader the frozen base weights are absent on purpose."""
        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            return {"load_module_strict": False}
        return {"strict": False}
