"""Atomic writes: a crash or ``kill -9`` never leaves a file or folder that looks complete but is not.

Every output is written under a temporary name in the same folder and renamed into place: ``.NAME.tmp-PID`` while
it is written, ``.NAME.old-PID`` for the folder it replaces, ``.NAME.removing-PID`` for a run directory that
``--force`` is deleting. A process killed in between leaves such a name behind; :func:`clean_stale_temps` removes
those whose PID is gone when the run resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|removing)-(?P<pid>\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in (nearly) one rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(root: Path) -> list[Path]:
    """Remove every ``.X.tmp-PID`` / ``.X.old-PID`` / ``.X.removing-PID`` under ``root`` whose PID is not a live
    process on this machine (a write or export killed half-way); return what was removed.

    Callers hold the run directory's lock, so no other run can be writing there; a live PID (this process, or a PID
    recycled by an unrelated process) is left alone, which at worst keeps a stale folder until the next resume."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            m = TEMP_NAME.match(name)
            if m is None or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
                continue
            path = Path(folder) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if not TEMP_NAME.match(d)]
    return removed


def cache_root() -> Path:
    """prunelab's download and conversion cache (``$PRUNELAB_CACHE``, default ``~/.cache/prunelab``): here, at the
    bottom, because every room that caches (io's model conversions, evaluation's lm-eval task index) reads it."""
    return Path(os.environ.get("PRUNELAB_CACHE", Path.home() / ".cache" / "prunelab"))
