"""Run directory handling: atomic writes, stage folders, ``done.json`` that ``--resume`` trusts.

A crash or ``kill -9`` must never leave a file or folder that looks complete but is not, so every
output is written under a temporary name in the same folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from stages.core.files import atomic_dir, atomic_write_json, atomic_write_text

__all__ = ["RunDirError", "atomic_dir", "atomic_write_json", "atomic_write_text", "chain_hash", "prepare_run_dir",
           "read_done", "write_done"]


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists without --resume/--force, ...)."""


def prepare_run_dir(path: Path, resume: bool, force: bool) -> None:
    """Create ``path``; refuse to touch an existing run unless ``--resume`` or ``--force`` says so."""
    if path.exists() and any(path.iterdir()):
        if force:
            trash = path.with_name(f".{path.name}.removing-{os.getpid()}")
            path.rename(trash)
            shutil.rmtree(trash)
        elif not resume:
            raise RunDirError(
                f"run directory {path} already exists; pass --resume to continue it, --force to start over, "
                f"or --output-dir to write elsewhere"
            )
    path.mkdir(parents=True, exist_ok=True)


def chain_hash(previous: str, stage_type: str, settings: dict[str, Any]) -> str:
    """Hash of a stage's settings chained with every stage before it: change upstream → re-run downstream."""
    blob = json.dumps([previous, stage_type, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_done(stage_dir: Path, expected_hash: str, legacy_hash: str | None = None) -> dict[str, Any] | None:
    """The stage's ``done.json`` if it finished with exactly these settings, else None.

    ``legacy_hash`` is the same settings chained in the version-1 (flat) schema: a run directory made before
    the typed configs resumes as long as nothing it hashed has changed."""
    done = stage_dir / "done.json"
    if not done.is_file():
        return None
    data = json.loads(done.read_text())
    return data if data.get("config_hash") in {expected_hash, legacy_hash} - {None} else None


def write_done(stage_dir: Path, config_hash: str, seconds: float, outputs: dict[str, Any]) -> None:
    atomic_write_json(
        stage_dir / "done.json",
        {"config_hash": config_hash, "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": outputs},
    )
