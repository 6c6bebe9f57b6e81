"""Loading a model + tokenizer from an alias, a local folder, a GGUF file or a hub id (the load stage's library)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunelab.stages.core.files import atomic_dir
from prunelab.stages.io.config import ModelConfig
from prunelab.stages.io.loader import load_pruned
from prunelab.stages.io.sources import alias_dirs, classify, fetch_alias
from prunelab.stages.io.tiny import byte_tokenizer, tiny_alias

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is {name!r} but no CUDA device is visible; use device: cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def strip_quantization_leftovers(model: torch.nn.Module) -> None:
    """A GGUF load is dequantized to plain floats; its ``quantization_config`` must not be exported."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "auto_map"):  # custom-code pointers: never imported here, never exported
        del model.config.auto_map


def _per_layer_widths(path: str) -> bool:
    """Whether a local folder is a prunelab export with per-layer widths (``prunelab_layer_shapes``)."""
    config = Path(path) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("prunelab_layer_shapes"))


def _from_pretrained(path: str, gguf_file: str | None, cfg: ModelConfig, dtype: torch.dtype) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if not gguf_file and _per_layer_widths(path):  # a prunelab export whose layers differ: transformers cannot build it
        model = load_pruned(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tok_kwargs = {k: v for k, v in kwargs.items() if k in ("gguf_file", "revision")}
    tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
    strip_quantization_leftovers(model)
    getattr(tokenizer, "init_kwargs", {}).pop("auto_map", None)  # nor the tokenizer's custom-code pointer
    return model, tokenizer


def _load_alias(name: str, cfg: ModelConfig, dtype: torch.dtype) -> tuple[Any, Any]:
    gguf_dir, hf_dir = alias_dirs(name)
    if not (hf_dir / "config.json").is_file():
        fetch_alias(name)
        gguf = next(gguf_dir.glob("*.gguf"))
        log.info(f"converting {gguf.name} to a float32 safetensors copy in {hf_dir} (first use only)")
        model, tokenizer = _from_pretrained(str(gguf_dir), gguf.name, cfg, torch.float32)
        with atomic_dir(hf_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if dtype == torch.float32 and cfg.attn_implementation is None:
            return model, tokenizer
    return _from_pretrained(str(hf_dir), None, cfg, dtype)


def load_model(cfg: ModelConfig) -> tuple[Any, Any]:
    """Load model and tokenizer as the recipe says; the model is in eval mode on its device."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    src = classify(cfg.source, cfg.gguf_file)
    if src.kind == "tiny":
        model, tokenizer = tiny_alias(src.path).to(dtype), byte_tokenizer()
    elif src.kind == "alias":
        model, tokenizer = _load_alias(src.path, cfg, dtype)
    else:
        model, tokenizer = _from_pretrained(src.path, src.gguf_file, cfg, dtype)
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
