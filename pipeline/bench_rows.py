"""Finished rows of a bench, kept on disk so a killed multi-hour bench resumes where it stopped.

The 20% bench on SmolLM2 is 26 rows of several minutes each (two text domains, ARC-Easy in full, decode speed):
hours on a CPU. Each row — the dense evaluation, each criterion's scores, each depth or width row, the PPL-cost
ratio — is written atomically under ``<output_dir>/<name>/rows/<kind>-<key>.json`` the moment it is done. ``key``
hashes everything that decides the entry: the model, seed, calibration set and evaluation settings shared by the
whole bench, plus the row's own settings. A row whose settings changed gets a new key and is recomputed; the code
version is not in the key, so after a change to the library, start over with ``--force``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunelab.rundir import RunDirError, atomic_write_json, chain_hash, prepare_run_dir

__all__ = ["BenchRowsError", "RowCache"]


class BenchRowsError(RuntimeError):
    """Rows of an earlier run exist and the command did not say whether to reuse them."""


class RowCache:
    """``get`` / ``put`` one finished bench entry by kind and settings; counts what it reused. ``root`` None keeps
    nothing (a bench run from Python without a folder)."""

    def __init__(self, root: Path | None, shared: dict[str, Any]) -> None:
        self.root = root
        self._shared = json.dumps(shared, sort_keys=True, default=str)
        self.reused: list[str] = []

    @classmethod
    def open(cls, root: Path, shared: dict[str, Any], resume: bool, force: bool) -> RowCache:
        """Refuse to mix with an earlier run's rows unless ``--resume`` (reuse) or ``--force`` (delete) says so."""
        try:
            prepare_run_dir(root, resume, force)
        except RunDirError as exc:
            if force:  # --force refused: a folder prunelab did not make (pipeline.rundir.force_refusal)
                raise BenchRowsError(str(exc)) from None
            raise BenchRowsError(f"{root} holds rows of an earlier run of this bench; pass --resume to reuse the "
                                 f"ones whose settings are unchanged, or --force to start over") from None
        return cls(root, shared)

    def path(self, kind: str, spec: dict[str, Any]) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{kind}-{chain_hash(self._shared, kind, spec)}.json"  # the run directory's stage hash

    def get(self, kind: str, spec: dict[str, Any]) -> Any | None:
        """The stored value, or None. A file that does not parse (writes are atomic, so only a hand edit makes
        one) or was stored for other settings counts as missing."""
        path = self.path(kind, spec)
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if entry.get("spec") != _plain(spec) or "value" not in entry:
            return None
        self.reused.append(path.name)
        return entry["value"]

    def put(self, kind: str, spec: dict[str, Any], value: Any) -> Any:
        path = self.path(kind, spec)
        if path is not None:
            atomic_write_json(path, {"kind": kind, "spec": _plain(spec), "value": value})
        return value

    def fetch(self, kind: str, spec: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """The stored value, or ``compute()`` stored now."""
        hit = self.get(kind, spec)
        return hit if hit is not None else self.put(kind, spec, compute())


def _plain(spec: dict[str, Any]) -> Any:
    """The spec as JSON reads it back (tuples as lists, paths as strings), so a stored spec compares equal."""
    return json.loads(json.dumps(spec, default=str))
