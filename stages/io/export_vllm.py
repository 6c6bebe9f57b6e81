"""vLLM export: a folder vLLM serves, per-layer widths and removed sublayers included (issue 25).

vLLM runs heterogeneous Llama-layout models as ``DeciLMForCausalLM`` (``vllm/model_executor/models/nemotron_nas.py``,
vLLM 0.32): ``config.block_configs[i]`` holds ``attention.n_heads_in_group`` / ``attention.no_op`` and
``ffn.intermediate_size`` / ``ffn.no_op``; query heads are one global ``num_attention_heads`` (a layer's KV heads are
``num_attention_heads // n_heads_in_group``); ``attention_bias`` / ``mlp_bias`` are global flags; weight names are
the Hugging Face Llama names (its ``load_weights`` stacks q/k/v and gate/up itself). So this export carries
per-layer MLP widths, per-layer KV-group counts where every layer keeps the same query heads, and removed sublayers
(``no_op``) — not per-layer query heads (:func:`vllm_refusal` says so, with the nearest setting that runs).

Uniform models (dense, depth-pruned, uniform width) need none of this: they are written as the family's own
vanilla checkpoint, which vLLM runs with its own model class and no custom code.

Why the heterogeneous folder ships ``configuration_decilm.py`` and needs ``trust_remote_code=True``: vLLM reads
``block_configs[i].attention.no_op`` as *attributes* and keys DeciLM's KV-head count on ``model_type ==
"nemotron-nas"`` (``transformers_utils/model_arch_config_convertor.py``), but neither transformers (5.19, vLLM's
pin) nor vLLM's own config registry has a config class for ``nemotron-nas``; ``AutoConfig`` only builds one from the
checkpoint's ``auto_map``. A ``model_type: llama`` config would load without it, but leaves ``block_configs`` as
plain dicts, which ``block_config.attention.no_op`` cannot read. The shipped file (:data:`DECILM_CONFIG_CODE`) is a
``LlamaConfig`` that turns the dicts into attribute objects (and back for ``to_dict``) — nothing else.

One vLLM quirk is worked around rather than refused: its decoder layer fuses the residual add into the next norm
and starts the residual at the first attention, so a model whose first non-empty layer has no attention but an
FFN would unpack a single tensor (``DeciLMDecoderLayer.forward``: ``post_attention_layernorm(h, None)`` returns one
tensor). That layer's attention is written as a zero attention (one KV group, all weights zero: it adds exactly 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from prunelab.stages.arch import adapter_for, per_layer_families

# vLLM 0.32 model classes for the families prunelab prunes (vllm/model_executor/models/registry.py): a uniform
# model of these runs under its own architecture.
VLLM_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "granite": "GraniteForCausalLM", "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
    "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
}
CONFIG_FILE = "configuration_decilm.py"
NEAREST = ("nearest setting that runs in vLLM: engines: [vllm] in the width prune (query heads uniform, MLP widths "
           "and whole sublayers per layer)")

DECILM_CONFIG_CODE = '''\
"""Config of a prunelab vLLM export: vLLM's DeciLMForCausalLM (model_type nemotron-nas) reads
``block_configs[i].attention.n_heads_in_group / .no_op`` and ``block_configs[i].ffn.intermediate_size / .no_op`` as
attributes; transformers has no config class for this model_type, so this one turns the JSON dicts into attribute
objects (and back in ``to_dict``). Written by prunelab (stages/io/export_vllm.py)."""
from types import SimpleNamespace

from transformers import LlamaConfig


def _obj(value):
    return SimpleNamespace(**{k: _obj(v) for k, v in value.items()}) if isinstance(value, dict) else value


def _plain(value):
    return {k: _plain(v) for k, v in vars(value).items()} if isinstance(value, SimpleNamespace) else value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.block_configs = [_obj(b) for b in (getattr(self, "block_configs", None) or [])]

    def validate_architecture(self):
        """Each layer's query heads split evenly into its KV groups (hidden_size need not divide by heads)."""
        for i, block in enumerate(getattr(self, "block_configs", None) or []):
            attn = block["attention"] if isinstance(block, dict) else block.attention
            no_op = attn["no_op"] if isinstance(attn, dict) else attn.no_op
            group = attn["n_heads_in_group"] if isinstance(attn, dict) else attn.n_heads_in_group
            if not no_op and self.num_attention_heads % group:
                raise ValueError(f"block_configs[{i}]: {self.num_attention_heads} heads in groups of {group}")

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [_plain(b) for b in out.get("block_configs") or []]
        return out
'''


def _layer_structure(model: nn.Module) -> list[dict[str, int]]:
    """Per layer: query heads, KV heads and MLP width as the model in memory holds them (0 = removed sublayer)."""
    return [{"num_attention_heads": g.n_q, "num_key_value_heads": g.n_kv, "intermediate_size": g.intermediate}
            for g in adapter_for(model).geometries()]


def _is_uniform(model: nn.Module) -> bool:
    """Whether the family's vanilla checkpoint holds the model: no per-layer shapes in the config, every layer of
    one geometry (experts included) and no removed sublayer."""
    ad = adapter_for(model)
    geos = ad.geometries()
    removed = any(not ad.has_sublayer(layer, which) for layer in ad.layers for which in ("attention", "mlp"))
    return not getattr(model.config, "prunelab_layer_shapes", None) and not removed and all(g == geos[0] for g in geos)


def _first_attention_fix(shapes: list[dict[str, int]]) -> int | None:
    """The layer whose removed attention vLLM cannot skip: the first layer with any sublayer, if it has no attention."""
    first = next((i for i, s in enumerate(shapes) if s["num_attention_heads"] or s["intermediate_size"]), None)
    return first if first is not None and not shapes[first]["num_attention_heads"] else None


def vllm_refusal(model: nn.Module) -> str | None:
    """Why vLLM cannot run this model's structure, naming the structure and the nearest setting that works; None
    where :func:`write_vllm_export` writes a folder vLLM runs."""
    cfg = model.config
    family = cfg.model_type
    if family not in VLLM_ARCHITECTURES:
        return (f"vllm: model_type {family!r} is not a family prunelab exports to vLLM (supported: "
                f"{', '.join(VLLM_ARCHITECTURES)}); export formats: [hf] and load it with transformers")
    if _is_uniform(model):
        return None
    shapes = _layer_structure(model)
    what = ("removed sublayers" if any(not v for s in shapes for v in s.values()) else "per-layer widths")
    decilm = per_layer_families("vllm")  # families whose layer is DeciLM's (q/k/v/o, gate/up/down, RMSNorm, RoPE)
    if family not in decilm:
        return (f"vllm: {what} of a {family!r} model — vLLM runs {family!r} only as {VLLM_ARCHITECTURES[family]}, "
                f"which reads one head count and one MLP width for all layers (per-layer structures run only for "
                f"{', '.join(decilm)}, as DeciLM); nearest setting that runs: allocation: uniform without "
                "`layers` and no sublayer removal")
    if family == "mistral" and getattr(cfg, "sliding_window", None) is not None:
        return (f"vllm: {what} of a mistral model with sliding_window {cfg.sliding_window} — vLLM's DeciLM attention "
                "has no sliding window, so it would attend further back than the model; nearest setting that runs: "
                "allocation: uniform (MistralForCausalLM keeps the window)")
    attn = [s for s in shapes if s["num_attention_heads"]]
    if not attn:
        return ("vllm: every attention sublayer is removed — vLLM's DeciLM needs one attention layer to size its KV "
                "cache (NemotronNasModelArchConfigConvertor); keep at least one attention sublayer")
    heads = sorted({s["num_attention_heads"] for s in attn})
    if len(heads) > 1:
        return (f"vllm: per-layer query heads {[s['num_attention_heads'] for s in shapes]} — vLLM's DeciLM has one "
                f"global num_attention_heads (a layer varies only its KV groups); {NEAREST}, or attention: none")
    uneven = [i for i, s in enumerate(shapes) if s["num_key_value_heads"] and heads[0] % s["num_key_value_heads"]]
    if uneven:
        return (f"vllm: layers {uneven} split {heads[0]} query heads into KV groups of unequal size — DeciLM's "
                f"n_heads_in_group must divide num_attention_heads; {NEAREST}")
    state = model.state_dict()
    for part, flag, roles in (("self_attn", "attention_bias", ("q", "k", "v", "o")),
                              ("mlp", "mlp_bias", ("gate", "up", "down"))):
        on = bool(getattr(cfg, flag, False))
        for i, s in enumerate(shapes):
            if not (s["num_attention_heads"] if part == "self_attn" else s["intermediate_size"]):
                continue
            have = [f"{r}_proj" for r in roles if (f"model.layers.{i}.{part}.{r}_proj.bias" in state) != on]
            if have:
                return (f"vllm: layer {i} {part} has biases on {have} only, but vLLM's DeciLM switches biases on all "
                        f"{part} projections at once ({flag}={on}); export formats: [hf] or [gguf] instead")
    return None


def decilm_config(model: nn.Module, shapes: list[dict[str, int]]) -> dict[str, Any]:
    """config.json for ``DeciLMForCausalLM``: the model's own config (rope, eps, token ids, biases, head_dim) with the
    per-layer structure as ``block_configs``."""
    cfg = model.config.to_dict()
    for k in ("prunelab_layer_shapes", "auto_map", "transformers_version", "_name_or_path", "sliding_window",
              "layer_types", "id2label", "label2id"):
        cfg.pop(k, None)
    heads = next(s["num_attention_heads"] for s in shapes if s["num_attention_heads"])
    fix = _first_attention_fix(shapes)
    blocks = []
    for i, s in enumerate(shapes):
        attn_on = bool(s["num_attention_heads"]) or i == fix
        kv = s["num_key_value_heads"] if s["num_attention_heads"] else 1
        blocks.append({"attention": {"n_heads_in_group": heads // kv if attn_on else heads, "no_op": not attn_on,
                                     "replace_with_linear": False},
                       "ffn": {"intermediate_size": s["intermediate_size"], "no_op": not s["intermediate_size"],
                               "replace_with_linear": False}})
    first_attn = next(s for s in shapes if s["num_attention_heads"])
    cfg.update(
        architectures=["DeciLMForCausalLM"], model_type="nemotron-nas",
        auto_map={"AutoConfig": f"{CONFIG_FILE[:-3]}.DeciLMConfig"},
        num_hidden_layers=len(shapes), num_attention_heads=heads,
        num_key_value_heads=first_attn["num_key_value_heads"],  # informative only: block_configs rule per layer
        intermediate_size=max(s["intermediate_size"] for s in shapes),
        head_dim=getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads,
        block_configs=blocks,
    )
    return cfg


def decilm_state(model: nn.Module, shapes: list[dict[str, int]]) -> dict[str, torch.Tensor]:
    """The weights under the names vLLM's ``DeciLMForCausalLM.load_weights`` reads (the Hugging Face Llama names);
    a tied head is left out (vLLM ties it to the embedding), the zero attention of :func:`_first_attention_fix` added."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    fix = _first_attention_fix(shapes)
    if fix is not None:
        emb = state["model.embed_tokens.weight"]
        hidden, heads = emb.shape[1], next(s["num_attention_heads"] for s in shapes if s["num_attention_heads"])
        hd = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        p = f"model.layers.{fix}"
        zeros = {"q": (heads * hd, hidden), "k": (hd, hidden), "v": (hd, hidden), "o": (hidden, heads * hd)}
        for r, shape in zeros.items():
            state[f"{p}.self_attn.{r}_proj.weight"] = emb.new_zeros(shape)
            if getattr(model.config, "attention_bias", False):
                state[f"{p}.self_attn.{r}_proj.bias"] = emb.new_zeros(shape[0])
        state[f"{p}.input_layernorm.weight"] = emb.new_ones(hidden)
    return state


def write_vllm_export(model: nn.Module, tokenizer: Any, out_dir: Path) -> dict[str, Any]:
    """Write a folder vLLM loads (config.json, model.safetensors, tokenizer) into ``out_dir`` (the caller creates it
    atomically). Uniform models: the family's vanilla checkpoint. Heterogeneous Llama-layout models: DeciLM
    ``block_configs`` + ``configuration_decilm.py`` (load with ``trust_remote_code=True``). Raises ValueError with
    :func:`vllm_refusal`'s reason for a structure vLLM cannot run. Returns what was written."""
    reason = vllm_refusal(model)
    if reason:
        raise ValueError(reason)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = _layer_structure(model)
    if _is_uniform(model):
        model.save_pretrained(out_dir, safe_serialization=True)
        arch, remote = VLLM_ARCHITECTURES[model.config.model_type], False
    else:
        cfg = decilm_config(model, shapes)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (out_dir / CONFIG_FILE).write_text(DECILM_CONFIG_CODE)
        save_file(decilm_state(model, shapes), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
        arch, remote = "DeciLMForCausalLM", True
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {"path": str(out_dir), "architecture": arch, "trust_remote_code": remote,
            "zero_attention_layer": None if arch != "DeciLMForCausalLM" else _first_attention_fix(shapes),
            "layers": len(shapes)}
