"""Content fingerprints of a stage's input files, cheap enough for 100 GB of weights: what ``--resume`` keys on.

A stage is restored only when its settings AND the content of every file it reads are what they were when it
ran. Hashing 100 GB on every resume would cost minutes, so a file's fingerprint is:

- a small file (at most ``FULL_HASH_LIMIT``: recipes' data files, JSONL, config.json, tokenizer files, an index):
  sha256 of every byte;
- a large file: its size, plus sha256 of ``SLICES`` fixed 1 MiB slices spread evenly from the first byte to the
  last, plus — for ``.safetensors`` — its whole JSON header (every tensor's name, dtype, shape and byte offsets),
  and for ``.gguf`` the first slice already covers the header's start (magic, version, tensor count, metadata).

Why that is sound enough: the fingerprint guards against *accidental* staleness — another checkpoint, a
re-download, a re-conversion, a fine-tuned copy, a truncated or half-copied file, a data file edited in place —
not against someone forging a same-size file that differs only between the sampled slices. A different
checkpoint of the same architecture differs in practically every weight (training moves all of them), so each
sampled MiB differs; a shape, dtype, tensor-set or size change shows in the header or the size; a truncated copy
changes the size. Data files, where one changed line matters, are small and hashed whole. Timestamps are left out
on purpose: copying or touching a folder must not re-run a day of work, and an in-place rewrite with the same
mtime must not be trusted.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

__all__ = ["FULL_HASH_LIMIT", "SLICE", "SLICES", "describe_changes", "digest", "file_fingerprint"]

FULL_HASH_LIMIT = 64 * 2**20  # files up to 64 MiB are hashed whole (~0.1 s)
SLICE = 2**20  # 1 MiB
SLICES = 8  # slices per large file: 8 MiB read per shard, ~160 MiB for a 100 GB model in 20 shards
SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header


def _sha256_whole(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 * SLICE), b""):
            h.update(block)
    return h.hexdigest()


def _safetensors_header(f: Any, size: int) -> bytes:
    """The raw JSON header of a safetensors file (8-byte little-endian length, then JSON); b"" if malformed."""
    if size < 8:
        return b""
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(SAFETENSORS_HEADER_LIMIT, size - 8):
        return b""
    return f.read(n)


def _sha256_sampled(path: Path, size: int) -> str:
    """sha256 over: the size, the safetensors header (if any), and SLICES fixed 1 MiB slices from first to last byte."""
    h = hashlib.sha256(f"size={size};".encode())
    with path.open("rb") as f:
        if path.suffix == ".safetensors":
            header = _safetensors_header(f, size)
            h.update(b"header=" + hashlib.sha256(header).digest())
        for k in range(SLICES):
            offset = (size - SLICE) * k // (SLICES - 1)
            f.seek(offset)
            h.update(f.read(SLICE))
    return h.hexdigest()


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex, "method": "whole" | "sampled"}`` of one file (raises OSError if unreadable)."""
    p = Path(path)
    size = p.stat().st_size
    if size <= FULL_HASH_LIMIT:
        return {"size": size, "sha256": _sha256_whole(p), "method": "whole"}
    return {"size": size, "sha256": _sha256_sampled(p, size), "method": "sampled"}


def digest(value: Any) -> str:
    """A short, stable hash of a JSON-serialisable fingerprint (what enters the chained inputs hash)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human lines naming what differs between two ``{input name: {"path": ..., "fingerprint": ...}}`` records."""
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if a is None:
            lines.append(f"{name}: new input {b.get('path')}")
        elif b is None:
            lines.append(f"{name}: no longer an input ({a.get('path')})")
        elif a.get("path") != b.get("path"):
            lines.append(f"{name}: now {b.get('path')} (was {a.get('path')})")
        else:
            fa, fb = a.get("fingerprint"), b.get("fingerprint")
            files = sorted(set(fa) | set(fb)) if isinstance(fa, dict) and isinstance(fb, dict) and "sha256" not in fa else []
            changed = [f for f in files if fa.get(f) != fb.get(f)]
            what = f" (files {', '.join(changed)})" if changed else ""
            lines.append(f"{name}: the content of {b.get('path')} changed{what}")
    return lines

