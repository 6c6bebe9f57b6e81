"""Load any model prunelab exported — including heterogeneous per-layer widths.

Uniform results (depth pruning, uniform width pruning) are vanilla checkpoints:
``AutoModelForCausalLM.from_pretrained(path)`` loads them. When layers differ in width (global /
adaptive allocation), ``config.json`` carries ``prunelab_layer_shapes`` — one
``{num_attention_heads, num_key_value_heads, intermediate_size}`` per layer — which transformers
cannot build yet (a removed sublayer is ``num_attention_heads = num_key_value_heads = 0`` — no attention — or
``intermediate_size = 0`` — no MLP; ``ArchAdapter.resize_layer`` puts the parameter-free no-ops of
``prunelab.stages.arch.noop`` in their place), so use::

    from prunelab.stages.io.loader import load_pruned
    model = load_pruned("runs/<name>/model")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prunelab.stages.arch import adapter_for


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(path / f))
        return out
    return load_file(path / "model.safetensors")


def apply_layer_shapes(model: nn.Module, shapes: list[dict[str, int]]) -> Any:
    """Resize each block of a uniformly built model to its ``prunelab_layer_shapes`` entry (heads, KV heads, MLP
    channels; 0 = a removed sublayer); returns the model's adapter. On meta or empty weights: shapes only."""
    ad = adapter_for(model)
    for layer, shape in zip(ad.layers, shapes, strict=True):
        ad.resize_layer(layer, shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"])
    return ad


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **kwargs: Any) -> nn.Module:
    """Load a prunelab export; heterogeneous widths are rebuilt layer by layer, then weights loaded."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    shapes = getattr(config, "prunelab_layer_shapes", None)
    if not shapes:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).eval()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    ad = apply_layer_shapes(model, shapes)
    state = _state_dict(path)
    model = model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {f"{ad.head_name()}.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    bad = [k for k in missing if k not in allowed_missing and not ad.is_rotary_buffer(k)]
    if bad or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match its per-layer shapes (missing {bad[:5]}, unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    adapter_for(model).reset_rotary(config, device)  # its buffers were on meta
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
