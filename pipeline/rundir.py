"""Run directory handling: atomic writes, stage folders, ``done.json`` that ``--resume`` trusts.

A crash or ``kill -9`` must never leave a file or folder that looks complete but is not, so every
output is written under a temporary name in the same folder and renamed into place.

``<output_dir>/<name>`` may be anyone's folder (``out/Documents``), so a run directory prunelab creates carries a
marker file (:data:`MARKER`) and ``--force`` deletes nothing else. The marker guards against mistakes, not against
someone who copies it into a folder on purpose.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from prunelab.stages.core.files import TEMP_NAME, atomic_dir, atomic_write_json, atomic_write_text, pid_alive
from prunelab.stages.core.fingerprint import describe_changes

__all__ = ["MARKER", "RunDirError", "atomic_dir", "atomic_write_json", "atomic_write_text", "chain_hash", "describe_force",
           "force_refusal", "match_done", "prepare_run_dir", "read_done", "read_marker", "write_done"]


MARKER = ".prunelab-run.json"  # written into every run directory prunelab creates; --force deletes only those
MARKER_VERSION = 1


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists without --resume/--force, ...)."""


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a run directory prunelab made, or None (no marker, or one that does not parse as ours)."""
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "prunelab" else None


def write_marker(path: Path, name: str | None = None) -> None:
    atomic_write_json(path / MARKER, {"tool": "prunelab", "version": MARKER_VERSION, "name": name or path.name,
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _looks_like_old_run(path: Path) -> bool:
    """A run directory made before the marker existed: a resolved recipe or a stage's done.json in it."""
    return (path / "recipe.resolved.yaml").is_file() or any(path.glob("[0-9][0-9]-*/done.json"))


def force_refusal(path: Path) -> str | None:
    """Why ``--force`` must not delete ``path`` (None: it may). Only an empty folder or a folder carrying the
    marker prunelab writes is deleted: ``<output_dir>/<name>`` may be anyone's folder (``out/Documents``)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    if path.is_symlink() or not path.is_dir():
        return f"{path} is not a folder prunelab made; --force deletes only run directories. Choose another name or output_dir"
    if read_marker(path) is not None:
        return None
    if _looks_like_old_run(path):
        return (f"{path} looks like a run directory made by an older prunelab (it has no {MARKER} marker), so --force "
                f"will not delete it; delete it by hand (rm -r {shlex.quote(str(path))}) and run again, or continue "
                f"it with --resume")
    return (f"{path} exists and is not a prunelab run directory (no {MARKER} marker), so --force will not delete it; "
            f"choose another name (name=...) or --output-dir, or move that folder away")


def describe_force(path: Path) -> str | None:
    """What ``--force`` would do to ``path``, for ``--dry-run --force``: one line, or None when nothing exists."""
    if not path.exists():
        return None
    refusal = force_refusal(path)
    if refusal is not None:
        return f"--force would be REFUSED: {refusal}"
    if path.is_dir() and not any(path.iterdir()):
        return f"--force: {path} is an empty folder; nothing would be deleted"
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    size = sum(p.stat().st_size for p in files)
    marker = read_marker(path) or {}
    return (f"--force would DELETE {path} (run {marker.get('name')!r} made {marker.get('created')}): {len(files)} files, "
            f"{size / 2**20:.1f} MiB")


def prepare_run_dir(path: Path, resume: bool, force: bool, name: str | None = None) -> None:
    """Create ``path``; refuse to touch an existing run unless ``--resume`` or ``--force`` says so.

    ``--force`` deletes only an empty folder or one carrying prunelab's marker (:func:`force_refusal`). A new or
    emptied directory gets the marker; a folder without one that is resumed does not (it may hold others' files)."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run directory {path} exists and is a file, not a folder; choose another name or output_dir")
    if path.exists() and any(path.iterdir()):
        if force:
            refusal = force_refusal(path)
            if refusal is not None:
                raise RunDirError(refusal)
            trash = path.with_name(f".{path.name}.removing-{os.getpid()}")
            path.rename(trash)
            shutil.rmtree(trash)
        elif not resume:
            raise RunDirError(
                f"run directory {path} already exists; pass --resume to continue it, --force to start over, "
                f"or --output-dir to write elsewhere"
            )
    for stale in path.parent.glob(f".{glob.escape(path.name)}.removing-*") if path.parent.is_dir() else []:
        m = TEMP_NAME.match(stale.name)  # a --force killed while deleting: finish the job
        if m is not None and not pid_alive(int(m["pid"])):
            shutil.rmtree(stale, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    if not any(path.iterdir()):
        write_marker(path, name)


def chain_hash(previous: str, stage_type: str, settings: dict[str, Any]) -> str:
    """Hash of a stage's settings chained with every stage before it: change upstream → re-run downstream."""
    blob = json.dumps([previous, stage_type, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_done(stage_dir: Path, expected_hash: str, legacy_hash: str | None = None) -> dict[str, Any] | None:
    """The stage's ``done.json`` if it finished with exactly these settings, else None (inputs not checked here:
    see :func:`match_done`).

    ``legacy_hash`` is the same settings chained in the version-1 (flat) schema: a run directory made before
    the typed configs resumes as long as nothing it hashed has changed."""
    done = stage_dir / "done.json"
    if not done.is_file():
        return None
    try:
        data = json.loads(done.read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("config_hash") in {expected_hash, legacy_hash} - {None} else None


def match_done(stage_dir: Path, expected_hash: str, legacy_hash: str | None, inputs_hash: str,
               inputs: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the stage's ``done.json`` if it may be restored, else None; why not, or None when it never finished).

    A stage is restored only when its settings chain (``config_hash``) AND the chained fingerprints of every input
    file up to it (``inputs_hash``, see ``prunelab.stages.core.fingerprint``) are those it ran with. A ``done.json`` written
    before inputs were recorded has no ``inputs_hash``; it is returned with ``"legacy_inputs": True`` for the runner
    to adopt (trust on first use: the files as they are now become the reference for later resumes)."""
    if not (stage_dir / "done.json").is_file():
        return None, None
    data = read_done(stage_dir, expected_hash, legacy_hash)
    if data is None:
        return None, "its settings, or those of an earlier stage, changed"
    if "inputs_hash" not in data:
        return {**data, "legacy_inputs": True}, None
    if data["inputs_hash"] != inputs_hash:
        changes = describe_changes(data.get("inputs") or {}, inputs)
        return None, "; ".join(changes) if changes else "an input file of an earlier stage changed"
    return data, None


def write_done(stage_dir: Path, config_hash: str, seconds: float, outputs: dict[str, Any],
               inputs: dict[str, Any] | None = None, inputs_hash: str | None = None, finished: str | None = None) -> None:
    record: dict[str, Any] = {"config_hash": config_hash, "seconds": round(seconds, 3),
                              "finished": finished or time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": outputs}
    if inputs_hash is not None:
        record["inputs_hash"] = inputs_hash
        record["inputs"] = inputs or {}
    atomic_write_json(stage_dir / "done.json", record)
