"""Write a pruned model as a GGUF file that llama.cpp runs, and check it against transformers.

Why our own writer: llama.cpp's ``convert_hf_to_gguf.py`` cannot read ``prunelab_layer_shapes`` and its ``deci``
path rounds FFN widths to multiples of 256 and guesses the tokenizer from the vocabulary size. Every detail below
was checked against llama.cpp's source (``src/llama-model.cpp`` load_hparams / load_tensors, ``src/models/llama.cpp``
and ``src/models/deci.cpp``, gguf-py's constants) and is proven by the tests comparing logits with transformers:

- Uniform Llama-layout models (llama, mistral without a sliding window, qwen2, qwen3) go under their own
  architecture; per-layer widths and removed sublayers of llama / mistral / qwen2 go under ``deci``, whose
  ``attention.head_count``, ``head_count_kv`` and ``feed_forward_length`` are per-layer arrays (0 = no attention /
  no FFN; a layer with 0 heads has no attention tensors, 0 FFN channels no FFN tensors).
- SmolLM3 (``smollm3``), OLMo 3 (``olmo2``) and GLM-4 (``glm4``) go under their own architectures, uniform only
  (layer 0's widths size every layer's tensors there); the tables below say what each loads beyond the Llama layout,
  and :func:`structure_refusal` / ``_model_refusal`` what it cannot hold (docs/deploy.md).
- llama / deci rotate q/k pairs interleaved (GPT-J style), HF rotates halves: q_proj / k_proj rows (and their
  biases) get convert_hf_to_gguf's ``LlamaModel.permute``, per head, so it holds for any per-layer head count.
  qwen2 / qwen3 use NEOX rope in llama.cpp: no permute.
- Biases: llama and deci load optional bq/bk/bv/bo and ffn_{gate,up,down}_b; qwen2 / qwen3 read bq/bk/bv only
  (qwen3 none), so an output bias (bias / optimal compensation) on those is refused with the reason.
- Tied embeddings: no ``output.weight`` (llama.cpp then reuses ``token_embd``).
- deci in the llama.cpp we test (llama-cpp-python 0.3.36) drops the attention output of a layer whose FFN is
  removed (``if (n_ff == 0) continue;`` skips ``inpL = cur``), so a removed FFN under a kept attention is written as
  an FFN of ``NULL_FFN_WIDTH`` channels whose weights are all zero: silu(0)·0 = 0, the layer's output is exact.
- q8_0 keeps ``token_embd`` / ``output`` in f16 unless told otherwise (``embedding_dtype``). llama-quantize's own
  q8_0 leaves them q8_0 (``llama_tensor_get_type`` in src/llama-quant.cpp raises the output matrix to Q6_K for the
  k-quants only, "new_type != Q8_0"), and offers ``--token-embedding-type`` / ``--output-tensor-type`` to set them
  apart; we set them to f16 because on small models the tied embedding is the output head (21% of SmolLM2-135M's
  weights) and q8_0 there, with llama.cpp quantizing the activations it multiplies to q8_0 as well, took a
  sublayer-removed SmolLM2 to +1.20% perplexity over f32, past the 1% the issue allows; f16 there: +0.87% (dense:
  +0.58% → +0.52%; docs/deploy.md). It costs 25 MB on SmolLM2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prunelab.stages.arch import families, per_layer_families
from prunelab.stages.io.sources import ALIASES, alias_dirs, classify

if TYPE_CHECKING:
    import torch
    from torch import nn

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


def native_arch() -> dict[str, str]:
    """model_type → its own llama.cpp architecture, from the families' registered facts (``engines["llama.cpp"]``)."""
    return {t: f.engines["llama.cpp"] for f in families() if "llama.cpp" in f.engines for t in f.model_types}


EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")  # write_gguf's embedding_dtype applies to these
# token_embd / output type when write_gguf is not told (module docstring, "q8_0"); other dtypes: the same as dtype
EMBEDDING_DEFAULT = {"q8_0": "f16"}


def default_embedding_dtype(dtype: str) -> str:
    """The type ``token_embd`` / ``output`` get in a ``dtype`` file unless ``embedding_dtype`` says otherwise."""
    return EMBEDDING_DEFAULT.get(dtype, dtype)


def ggml_type(dtype: str) -> Any:
    """The gguf.GGMLQuantizationType a matrix of ``dtype`` is stored as (rows of whole 32-blocks for q8_0)."""
    import gguf  # lazy: startup

    return getattr(gguf.GGMLQuantizationType, dtype.upper())
NULL_FFN_WIDTH = 32  # one Q8_0 block: the zero FFN stands in for a removed one under a kept attention
ZERO_FFN_WORKAROUND = True  # False writes n_ff = 0 as llama.cpp documents it (tests prove llama.cpp then errs)
# families with structure llama.cpp runs, but whose mapping is not written and verified here: the nearest setting
NOT_MAPPED_HINT = "export formats [hf] (or [hf, vllm] where vLLM runs it)"

# What each llama.cpp architecture loads beyond the Llama layout (llama-cpp-python 0.3.36, src/models/<arch>.cpp:
# load_arch_tensors and the graph; gguf-py tensor_mapping.py for the names). The norms around each sublayer as
# (transformers child of the decoder layer, GGUF tensor name): OLMo 2/3 norm a sublayer's output only, GLM-4 both sides.
LLAMA_NORM_TENSORS = {"attention": (("input_layernorm", "attn_norm"),), "mlp": (("post_attention_layernorm", "ffn_norm"),)}
SUBLAYER_NORM_TENSORS: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "olmo2": {"attention": (("post_attention_layernorm", "post_attention_norm"),),
              "mlp": (("post_feedforward_layernorm", "post_ffw_norm"),)},
    "glm4": {"attention": (("input_layernorm", "attn_norm"), ("post_self_attn_layernorm", "post_attention_norm")),
             "mlp": (("post_attention_layernorm", "ffn_norm"), ("post_mlp_layernorm", "post_ffw_norm"))},
}
ROPE_PERMUTE = ("llama", "deci", "smollm3")  # LLAMA_ROPE_TYPE_NORM (pairs) on HF's rotate-halves rows: permuted.
# glm4 is NORM too, but HF's GLM-4 already rotates interleaved pairs (convert_hf_to_gguf's Glm4Model: no permute);
# qwen2 / qwen3 / olmo2 are NEOX (halves), as HF.
QK_NORM_ARCHS = ("qwen3", "olmo2")  # attn_q_norm / attn_k_norm (qwen3 per head; olmo2 over the whole projection)
FUSED_GATE_UP = ("glm4",)  # ffn_up holds gate's rows then up's ({n_embd, 2·n_ff}, LLM_FFN_SWIGLU), no ffn_gate
OUTPUT_REQUIRED = ("olmo2",)  # output.weight is not optional: a tied head is written out as its own tensor
OUTPUT_BIAS_ARCHS = ("llama", "deci")  # the archs whose graphs add bo and ffn_{gate,up,down}_b
# what deci (the Llama layout, where per-layer widths run) does not load of each other architecture's layers
NOT_IN_DECI = {"qwen3": "per-head q/k norms", "smollm3": "layers without rotary (NoPE)",
               "olmo2": "norms after the sublayers, q/k norms", "glm4": "norms after the sublayers, a fused gate_up, "
                                                                   "partial rotary"}
SMOLLM3_NOPE_STEP = 4  # llama.cpp's smollm3 sets n_no_rope_layer_step = 4 itself (not read from the file)

# HF tokenizer.json pre-tokenizer → llama.cpp ``tokenizer.ggml.pre`` (src/llama-vocab.cpp): matched on the pattern
# of the Split step (or a plain ByteLevel). Extend by adding the regex llama.cpp uses for a name it knows.
_GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {
    "byte-level, no regex, no merges": "default",  # every token a byte: any split gives the same ids
    "byte-level gpt-2 regex": "gpt-2",
    "digits + byte-level gpt-2 regex (SmolLM)": "smollm",
    "llama-3 split + byte-level": "llama-bpe",
}


INERT_MERGE = "<inert> <merge>"


class GGUFExportError(ValueError):
    """A model or tokenizer the GGUF writer cannot express exactly (the message names the fix)."""


# ---------------------------------------------------------------------------------------------------- structure
def _linear(module: Any, name: str) -> Any:
    return getattr(module, name, None)


def layer_widths(model: nn.Module) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, FFN channels) per layer, read from the weights (0 = removed sublayer)."""
    head_dim = _head_dim(model)
    out = []
    for layer in _layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        q, k, up = _linear(attn, "q_proj"), _linear(attn, "k_proj"), _linear(mlp, "up_proj")
        fused = _linear(mlp, "gate_up_proj")  # GLM-4: gate's rows, then up's
        out.append((q.weight.shape[0] // head_dim if q is not None else 0,
                    k.weight.shape[0] // head_dim if k is not None else 0,
                    up.weight.shape[0] if up is not None else fused.weight.shape[0] // 2 if fused is not None else 0))
    return out


def _layers(model: nn.Module) -> list[Any]:
    return list(model.model.layers)


def _head_dim(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def gguf_arch(model: nn.Module) -> str:
    """The llama.cpp architecture this model is written under (``deci`` for per-layer widths / removed sublayers)."""
    refusal = gguf_refusal(model)
    if refusal:
        raise GGUFExportError(refusal)
    widths = layer_widths(model)
    return native_arch()[model.config.model_type] if len(set(widths)) == 1 and 0 not in widths[0] else "deci"


def gguf_refusal_for(model_type: str, heterogeneous: bool, sliding_window: int | None = None,
                     rope_type: str = "default", output_bias: bool = False) -> str | None:
    """Why llama.cpp cannot run this structure as written here, with the nearest setting that works; None = it can.
    Used on a loaded model (``gguf_refusal``) and at ``--dry-run`` from the recipe alone (``recipe_gguf_refusal``)."""
    if model_type not in native_arch():
        return (f"export.formats gguf: llama.cpp export of the {model_type!r} family is not written or verified here; "
                f"use {NOT_MAPPED_HINT} (GGUF export supports {', '.join(native_arch())})")
    if heterogeneous and model_type not in per_layer_families("llama.cpp"):
        arch = native_arch()[model_type]
        return (f"export.formats gguf: llama.cpp runs per-layer widths and removed sublayers only as `deci`, the "
                f"Llama layout ({', '.join(per_layer_families('llama.cpp'))}); {model_type} runs under its own "
                f"`{arch}` architecture, which reads one head count and one FFN width for every layer, and its layers "
                f"have what deci does not load ({NOT_IN_DECI.get(arch, 'another layout')}); nearest setting that "
                f"works: prune allocation: uniform (one width for every layer), or units: blocks")
    if sliding_window is not None and model_type == "mistral":
        return (f"export.formats gguf: llama.cpp's llama architecture has no sliding-window attention, and this "
                f"mistral model attends over windows of {sliding_window} tokens, so its logits would differ past "
                f"that length; use export formats [hf] (a Mistral whose config has sliding_window: null exports)")
    if rope_type not in ("default", None):
        return (f"export.formats gguf: rope scaling {rope_type!r} is not written by this exporter (llama.cpp needs "
                f"rope_freqs); use export formats [hf]")
    arch = "deci" if heterogeneous else native_arch()[model_type]
    if output_bias and arch not in OUTPUT_BIAS_ARCHS:
        return (f"export.formats gguf: llama.cpp's {arch} graph has no attention-output / MLP biases, so bias "
                f"or optimal compensation cannot be exported to it; use prune compensation: none, or formats [hf]")
    return None


def structure_refusal(model_type: str, structure: str) -> str | None:
    """Why llama.cpp's architecture for ``model_type`` cannot hold a pruned ``structure`` (``blocks``: blocks removed;
    ``attention``: query heads / KV groups removed; ``hidden``: hidden channels removed) whatever the scores pick,
    with the nearest setting that runs; None = it can. Torch-free (``--dry-run``); the writer checks the model too."""
    arch = native_arch().get(model_type)
    if arch == "smollm3" and structure == "blocks":
        return (f"export.formats gguf: llama.cpp's smollm3 architecture skips rotary embeddings on every "
                f"{SMOLLM3_NOPE_STEP}th layer by its index (n_no_rope_layer_step = {SMOLLM3_NOPE_STEP}, fixed in "
                f"src/models/smollm3.cpp, not read from the file), so after blocks are removed the kept NoPE layers "
                f"(config.no_rope_layers) no longer sit where llama.cpp skips rotary and the logits change; nearest "
                f"setting that works: units: width with allocation: uniform (every layer kept), or export formats [hf]")
    if arch == "olmo2" and structure in ("attention", "hidden"):
        return (f"export.formats gguf: llama.cpp's olmo2 architecture (OLMo 2 and 3) sizes q_proj, o_proj and the "
                f"q norm by the hidden size (n_head·head_dim = n_embd, src/models/olmo2.cpp), so a model whose "
                f"{'query heads' if structure == 'attention' else 'hidden channels'} are pruned does not load; "
                f"nearest setting that works: units: width with attention: none (MLP channels only), or units: "
                f"blocks, or export formats [hf]")
    return None


def config_gguf_refusal(model_type: str | None, config: Any) -> str | None:
    """What a config asks of its family's llama.cpp architecture that it cannot do (None: nothing), read from a
    config object or config.json's mapping — torch-free, so ``--dry-run`` can ask it before a run; absent keys take
    transformers' defaults (SmolLM3: a NoPE layer every ``no_rope_layer_interval``; OLMo 3: every 4th layer full)."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    arch, n = native_arch().get(model_type or ""), int(get("num_hidden_layers", 0) or 0)
    if arch == "smollm3":
        nope = [int(r) for r in get("no_rope_layers", None) or
                [(i + 1) % int(get("no_rope_layer_interval", 4) or 4) != 0 for i in range(n)]]
        types = get("layer_types", None) or (["sliding_attention"] if get("use_sliding_window", False)
                                             and get("sliding_window", None) is not None and 0 in nope else [])
        if "sliding_attention" in types:
            return ("export.formats gguf: llama.cpp's smollm3 architecture has no sliding-window attention, and this "
                    "model's config has use_sliding_window: true; use export formats [hf]")
        fixed = [int((i + 1) % SMOLLM3_NOPE_STEP != 0) for i in range(len(nope))]
        if nope != fixed:
            return (f"{structure_refusal(model_type or '', 'blocks').split(';')[0]} — this model's no_rope_layers are "
                    f"{nope}, llama.cpp would run {fixed}; nearest setting that works: units: width with allocation: "
                    f"uniform (every layer kept), or export formats [hf]")
    if arch == "olmo2":
        heads, hidden = int(get("num_attention_heads")), int(get("hidden_size"))
        head_dim = int(get("head_dim", None) or hidden // heads)
        if heads * head_dim != hidden:
            return structure_refusal(model_type or "", "attention") + (
                f" (this model: {heads} heads of {head_dim}, hidden {hidden})")
        kinds = set(get("layer_types", None) or ["sliding_attention", "full_attention"])
        params = get("rope_parameters", None) or {}
        ropes = {k: (float(v.get("rope_theta", 10000.0)), v.get("rope_type", "default"))
                 for k, v in params.items() if isinstance(v, dict) and k in kinds}
        if len(set(ropes.values())) > 1:
            return (f"export.formats gguf: llama.cpp's olmo2 graph rotates sliding and full layers with one rope base "
                    f"(freq_base; rope.freq_base_swa is read but unused there), and this model's differ: {ropes}; use "
                    f"export formats [hf]")
    return None


def _model_refusal(model: nn.Module) -> str | None:
    """What a loaded model's config and weights ask of its llama.cpp architecture that it cannot do."""
    cfg = model.config
    if native_arch().get(cfg.model_type) == "olmo2":  # the weights' heads (a pruned config may not say)
        heads = sorted({w[0] for w in layer_widths(model)})
        if {h * _head_dim(model) for h in heads} != {cfg.hidden_size}:
            return structure_refusal(cfg.model_type, "attention") + (
                f" (this model: {heads} heads of {_head_dim(model)}, hidden {cfg.hidden_size})")
    return config_gguf_refusal(cfg.model_type, cfg)


def gguf_refusal(model: nn.Module) -> str | None:
    """``gguf_refusal_for`` on a loaded model (biases read from its modules), then what its architecture asks."""
    cfg = model.config
    widths = layer_widths(model) if cfg.model_type in native_arch() else []
    hetero = len(set(widths)) > 1 or any(0 in w for w in widths)
    out_bias = any(getattr(_linear(part, name), "bias", None) is not None
                   for layer in _layers(model) for part, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj"),
                                                                  (layer.mlp, "gate_proj"), (layer.mlp, "up_proj"))
                   ) if cfg.model_type in native_arch() else False
    return gguf_refusal_for(cfg.model_type, hetero, getattr(cfg, "sliding_window", None),
                            _rope(cfg)[1], out_bias) or _model_refusal(model)


def recipe_gguf_refusals(model_type: str | None, recipe: Any, config: dict[str, Any] | None = None) -> list[str]:
    """At ``--dry-run`` (pipeline/preflight.py ``_family_problems``), before any model loads: refuse a gguf export
    the family, a prune stage's settings or the checkpoint's ``config`` (config.json, when the source has one) cannot
    give llama.cpp, naming the field and the nearest setting."""
    exports = [k for k, st in recipe.stages.items() if getattr(st, "type", None) == "export" and "gguf" in st.formats]
    if model_type is None or not exports:
        return []
    prunes = [st for st in recipe.stages.values() if getattr(st, "type", None) == "prune"]
    hetero = any(getattr(getattr(st, "allocation", None), "type", "uniform") != "uniform"
                 or getattr(st, "layers", None) is not None
                 or getattr(st, "units", None) == "sublayers" for st in prunes)
    comps = [getattr(st, "compensation", None) for st in prunes]
    bias = any(getattr(c, "type", None) == "bias" or (getattr(c, "type", None) == "optimal" and getattr(c, "bias", False))
               for c in comps)
    reasons = [gguf_refusal_for(model_type, hetero, None, "default", bias)]
    for st in prunes:  # structures the family's llama.cpp architecture cannot hold, whichever units are picked
        units = getattr(st, "units", None)
        structure = "attention" if units == "width" and getattr(st, "attention", "none") != "none" else units
        reasons.append(structure_refusal(model_type, structure) if reasons[0] is None else None)
    if config is not None and not any(reasons):  # what the config asks of the architecture's fixed patterns
        reasons.append(config_gguf_refusal(model_type, config))
    return [f"stages.{exports[0]}.{r.removeprefix('export.')}" for r in dict.fromkeys(reasons) if r]


def _rope_kinds(cfg: Any) -> dict[str, dict[str, Any]]:
    """Rope parameters per layer kind where the config keeps one set per kind (OLMo 3, Gemma 3); else {}."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return {k: v for k, v in params.items() if isinstance(v, dict)}


def _rope(cfg: Any) -> tuple[float, str]:
    kinds = _rope_kinds(cfg)
    params = kinds.get("full_attention") or next(iter(kinds.values()), None) or getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), rope_type


def _rope_dims(cfg: Any, head_dim: int) -> int:
    """Rotated dims per head: GLM-4's partial rotary turns the first ``partial_rotary_factor``·head_dim only."""
    factor = (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor") \
        or getattr(cfg, "partial_rotary_factor", None) or 1.0
    return int(head_dim * float(factor))


# ---------------------------------------------------------------------------------------------------- tensors
def permute_rope(w: np.ndarray, head_dim: int) -> np.ndarray:
    """HF (rotate halves) → GGUF (interleaved pairs) row order of q_proj / k_proj, per head:
    convert_hf_to_gguf's LlamaModel.permute written per head, so any head count per layer works."""
    return w.reshape(-1, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors (norms, biases) stay f32 as llama.cpp's converter
    keeps them; Q8_0 needs rows that are whole 32-blocks, others fall back to f16 as llama-quantize does."""
    import gguf  # lazy: startup

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim == 1 or dtype == "f32":
        return arr, None
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return arr.astype(np.float16), None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _tensors(model: nn.Module, arch: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor llama.cpp loads, in its order."""
    cfg = model.config
    hd = _head_dim(model)
    rope_permute = arch in ROPE_PERMUTE
    norms = SUBLAYER_NORM_TENSORS.get(arch, LLAMA_NORM_TENSORS)
    out: list[tuple[str, np.ndarray]] = [("token_embd.weight", _np(model.model.embed_tokens.weight))]
    for i, (layer, (nh, nkv, nff)) in enumerate(zip(_layers(model), layer_widths(model))):
        p = f"blk.{i}."
        if nh:
            attn = layer.self_attn
            out += [(p + gname + ".weight", _np(getattr(layer, child).weight)) for child, gname in norms["attention"]]
            for proj, gname in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
                lin = getattr(attn, proj)
                w, b = _np(lin.weight), None if lin.bias is None else _np(lin.bias)
                if rope_permute and proj in ("q_proj", "k_proj"):
                    w = permute_rope(w, hd)
                    b = None if b is None else permute_rope(b, hd)
                out.append((p + gname + ".weight", w))
                if b is not None:
                    out.append((p + gname + ".bias", b))
            if arch in QK_NORM_ARCHS:
                out.append((p + "attn_q_norm.weight", _np(attn.q_norm.weight)))
                out.append((p + "attn_k_norm.weight", _np(attn.k_norm.weight)))
        if nff:
            mlp = layer.mlp
            out += [(p + gname + ".weight", _np(getattr(layer, child).weight)) for child, gname in norms["mlp"]]
            projs = ((("gate_up_proj", "ffn_up"), ("down_proj", "ffn_down")) if arch in FUSED_GATE_UP else
                     (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")))
            for proj, gname in projs:
                lin = getattr(mlp, proj)
                out.append((p + gname + ".weight", _np(lin.weight)))
                if lin.bias is not None:
                    out.append((p + gname + ".bias", _np(lin.bias)))
        elif nh and arch == "deci" and ZERO_FFN_WORKAROUND:  # module docstring: a zero FFN, not n_ff = 0, under attention
            h = cfg.hidden_size
            out.append((p + "ffn_norm.weight", np.ones(h, np.float32)))
            out += [(p + "ffn_gate.weight", np.zeros((NULL_FFN_WIDTH, h), np.float32)),
                    (p + "ffn_up.weight", np.zeros((NULL_FFN_WIDTH, h), np.float32)),
                    (p + "ffn_down.weight", np.zeros((h, NULL_FFN_WIDTH), np.float32))]
    out.append(("output_norm.weight", _np(model.model.norm.weight)))
    if not getattr(cfg, "tie_word_embeddings", False) or arch in OUTPUT_REQUIRED:
        out.append(("output.weight", _np(model.lm_head.weight)))
    return out


# ---------------------------------------------------------------------------------------------------- tokenizer
def tokenizer_fields_from_gguf(path: Path) -> list[tuple[str, Any, Any, Any]]:
    """Every ``tokenizer.*`` KV of a GGUF file as (key, value, type, sub_type), verbatim."""
    from gguf import GGUFReader, GGUFValueType  # lazy: startup

    out = []
    for key, field in GGUFReader(path).fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    return out


def pre_tokenizer_name(tj: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json (the PRE_TOKENIZERS table); unknown → refused."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    merges = (tj.get("model") or {}).get("merges") or []
    regex = next((s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None)
    byte_level = next((s for s in steps if s.get("type") == "ByteLevel"), None)
    if kinds == ["ByteLevel"] and not byte_level.get("use_regex", True) and not merges:
        return "default"
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if regex == _LLAMA3_REGEX and kinds == ["Split", "ByteLevel"]:
        return "llama-bpe"
    raise GGUFExportError(
        f"export.formats gguf: the tokenizer's pre-tokenizer {kinds} (regex {regex!r}) is not in the table "
        f"prunelab.stages.io.gguf_export.PRE_TOKENIZERS ({', '.join(PRE_TOKENIZERS.values())}); add its llama.cpp name there, "
        f"or load the model from a GGUF source whose tokenizer fields are copied verbatim")


def tokenizer_fields_from_hf(tokenizer: Any) -> list[tuple[str, Any, Any, Any]]:
    """BPE (gpt2) tokenizer metadata built from a fast tokenizer's tokenizer.json."""
    from gguf import GGUFValueType as T  # lazy: startup

    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"export.formats gguf: only BPE tokenizers are written (this one is "
                              f"{model.get('type')!r}); load the model from a GGUF source to copy its tokenizer")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until filled
    special = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 3 if tok in special else (4 if tok in {a["content"] for a in tj.get("added_tokens", [])} else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        # llama.cpp refuses a gpt2 vocab without a merges key and gguf-py cannot write an empty array: one inert merge
        # of two multi-character symbols that no merge ever forms, so tokenization is unchanged
        merges = [INERT_MERGE]
    out: list[tuple[str, Any, Any, Any]] = [
        ("tokenizer.ggml.model", "gpt2", T.STRING, None),
        ("tokenizer.ggml.pre", pre_tokenizer_name(tj), T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
    ]
    for attr, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            out.append((f"tokenizer.ggml.{key}", int(tid), T.UINT32, None))
    post = json.dumps(tj.get("post_processor") or {})
    out.append(("tokenizer.ggml.add_bos_token", tokenizer.bos_token is not None and tokenizer.bos_token in post,
                T.BOOL, None))
    if getattr(tokenizer, "chat_template", None):
        out.append(("tokenizer.chat_template", tokenizer.chat_template, T.STRING, None))
    return out


# ---------------------------------------------------------------------------------------------------- writer
def write_gguf(model: nn.Module, out_path: Path, dtype: str = "f16", tokenizer: Any = None,
               tokenizer_gguf: Path | None = None, name: str = "prunelab",
               embedding_dtype: str | None = None) -> dict[str, Any]:
    """Write ``model`` (a Llama-layout HF causal LM, possibly pruned) to ``out_path`` atomically (temp + rename).

    Tokenizer fields come verbatim from ``tokenizer_gguf`` when the model was loaded from a GGUF file, else are built
    from ``tokenizer`` (a fast BPE tokenizer). ``embedding_dtype`` is the type of ``token_embd`` / ``output``
    (llama-quantize's ``--token-embedding-type`` / ``--output-tensor-type``); None = ``default_embedding_dtype(dtype)``
    (f16 for q8_0: module docstring). Returns a summary (architecture, per-layer widths, dtypes, size)."""
    import gguf  # lazy: startup

    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"export.gguf.dtype: {dtype!r} is not one of {list(GGUF_DTYPES)}")
    if embedding_dtype is not None and embedding_dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"export.gguf.embedding_dtype: {embedding_dtype!r} is not one of {list(GGUF_DTYPES)} "
                              "(or null: the same as dtype)")
    arch = gguf_arch(model)
    cfg = model.config
    widths = layer_widths(model)
    hd = _head_dim(model)
    theta, _ = _rope(cfg)
    if tokenizer_gguf is not None:
        tok_fields = tokenizer_fields_from_gguf(tokenizer_gguf)
    elif tokenizer is not None:
        tok_fields = tokenizer_fields_from_hf(tokenizer)
    else:
        raise GGUFExportError("export.formats gguf: no tokenizer to write; llama.cpp needs one")
    tensors = _tensors(model, arch)  # before the file is opened: a refusal leaves nothing behind
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, arch)
    try:
        w.add_name(name)
        w.add_block_count(len(widths))
        w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
        w.add_embedding_length(cfg.hidden_size)
        if arch == "deci":
            # a removed FFN under a kept attention is written as the zero FFN (module docstring)
            w.add_feed_forward_length([nff or (NULL_FFN_WIDTH if nh and ZERO_FFN_WORKAROUND else 0)
                                       for nh, _, nff in widths])
            w.add_head_count([nh for nh, _, _ in widths])
            w.add_head_count_kv([nkv for _, nkv, _ in widths])
        else:
            w.add_feed_forward_length(widths[0][2])
            w.add_head_count(widths[0][0])
            w.add_head_count_kv(widths[0][1])
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(_rope_dims(cfg, hd))
        kinds = list(getattr(cfg, "layer_types", None) or ())
        if arch == "olmo2" and "sliding_attention" in kinds:  # one bool per layer: any pattern the pruning leaves
            w.add_sliding_window(int(cfg.sliding_window))
            w.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, val, vtype, sub in tok_fields:
            w.add_key_value(key, val, vtype, sub_type=sub)
        emb = embedding_dtype or default_embedding_dtype(dtype)
        for tname, arr in tensors:
            data, raw = _encode(arr, emb if tname in EMBEDDING_TENSORS else dtype)
            if raw is None:
                w.add_tensor(tname, data)
            else:
                w.add_tensor(tname, data, raw_shape=data.shape, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out_path), "architecture": arch, "dtype": dtype,
            "embedding_dtype": emb, "bytes": out_path.stat().st_size,
            "layers": [{"heads": a, "kv_heads": b, "ffn": c} for a, b, c in widths] if arch == "deci" else None}


def source_gguf(source: str, gguf_file: str | None) -> Path | None:
    """The GGUF file a model source was loaded from (alias or .gguf), whose tokenizer fields we copy; else None."""
    src = classify(source, gguf_file)
    if src.kind == "alias":
        path = alias_dirs(src.path)[0] / Path(ALIASES[src.path].member).name
        return path if path.is_file() else None
    if src.kind == "gguf":
        return Path(src.path) / str(src.gguf_file)
    return None


# ---------------------------------------------------------------------------------------------------- llama.cpp
def llama_cpp_missing() -> str | None:
    """None when llama_cpp imports, else why (with the fix)."""
    try:
        # lazy: optional
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama_cpp is not importable ({exc}); pip install 'prunelab[llama]' (builds llama-cpp-python)"
    return None


def _open(path: Path, n_ctx: int, n_threads: int) -> Any:
    from llama_cpp import Llama  # lazy: optional

    return Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                 n_threads_batch=n_threads, type_k=0, type_v=0, verbose=False)  # f32 KV cache (GGML_TYPE_F32):
    # llama.cpp's default f16 cache alone moves logits by ~1e-3


def gguf_logits(path: str | Path, ids: list[list[int]] | list[int], n_threads: int = 1, llm: Any = None) -> np.ndarray:
    """Next-token logits [windows, tokens, vocab] (float32) llama.cpp computes for each window of ``ids``."""
    flat = bool(ids) and not isinstance(ids[0], (list, tuple, np.ndarray))
    windows = [list(map(int, ids))] if flat else [list(map(int, w)) for w in ids]
    n = max(len(w) for w in windows)
    llm = llm or _open(Path(path), max(n, 8), n_threads)
    out = []
    for win in windows:
        llm.reset()  # n_tokens = 0: eval() then overwrites the cache from position 0
        llm.eval(win)
        out.append(np.array(llm.scores[: len(win)], dtype=np.float32))
    return np.stack(out) if len({len(w) for w in windows}) == 1 else np.array(out, dtype=object)


def gguf_perplexity(path: str | Path, ids: list[int], window: int, n_threads: int = 1) -> float:
    """Perplexity of ``ids`` in non-overlapping windows of ``window`` tokens (every token after the first of a
    window is predicted), the protocol our evaluate stage uses for transformers."""
    llm = _open(Path(path), window, n_threads)
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        win = ids[s : s + window]
        if len(win) < 2:
            break
        logits = gguf_logits(path, win, llm=llm)[0].astype(np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        tgt = np.asarray(win[1:])
        nll -= float(logp[np.arange(len(tgt)), tgt].sum())
        count += len(tgt)
    return float(np.exp(nll / count))


def compare_with_transformers(model: nn.Module, path: Path, ids: list[list[int]], n_threads: int = 1) -> dict[str, float]:
    """max |Δlogit| and argmax agreement between ``model`` and the GGUF at ``path`` on the same windows."""
    import torch  # lazy: torch-free

    ref = []
    with torch.inference_mode():
        for win in ids:
            ref.append(model(torch.tensor([win], device=model.device)).logits[0].float().cpu().numpy())
    got = gguf_logits(path, ids, n_threads=n_threads)
    ref_a = np.stack(ref)
    got_a = got[..., : ref_a.shape[-1]]
    return {"max_abs_diff": float(np.abs(got_a - ref_a).max()),
            "argmax_agreement": float((got_a.argmax(-1) == ref_a.argmax(-1)).mean()),
            "max_abs_logit": float(np.abs(ref_a).max())}
