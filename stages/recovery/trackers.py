"""Experiment trackers for recovery through accelerate (``loop.log_with``): which names exist, whether their
package is importable, and the calls the trainer makes.

Checked torch-free at recipe validation (accelerate itself imports torch, so the names are listed here, as in
``accelerate.tracking.LOGGER_TYPE_TO_CLASS``), so a typo or a missing package is refused before any model loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# accelerate's tracker name → the module(s) it needs (any one of them)
TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",),
    "swanlab": ("swanlab",), "trackio": ("trackio",),
}


def tracker_problems(names: list[str]) -> list[str]:
    """What is wrong with ``loop.log_with``, each with its fix (empty: fine)."""
    out = []
    for name in names:
        if name not in TRACKERS:
            out.append(f"log_with: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        elif not any(importlib.util.find_spec(m) for m in TRACKERS[name]):
            out.append(f"log_with: tracker {name!r} needs the package {TRACKERS[name][0]!r}: pip install {TRACKERS[name][0]}")
    if len(set(names)) != len(names):
        out.append(f"log_with: {names} names a tracker twice")
    return out


def start(acc: Any, names: list[str], run_name: str, config: dict[str, Any], project_dir: Path) -> bool:
    """Attach the trackers to the run's Accelerator (accelerate fixes ``log_with`` at construction, so the
    trackers are built here with accelerate's own filter and handed over) and start them; False when none."""
    if not names:
        return False
    from accelerate.tracking import filter_trackers  # lazy: torch-free

    project_dir.mkdir(parents=True, exist_ok=True)
    acc.log_with = filter_trackers(names, str(project_dir))
    acc.project_configuration.set_directories(str(project_dir))
    acc.init_trackers(run_name, config=config)
    return True


def log_step(acc: Any, step: int, loss: float, lr: float, tokens: int) -> None:
    acc.log({"loss": loss, "lr": lr, "tokens": tokens}, step=step)


def finish(acc: Any) -> None:
    acc.end_training()
