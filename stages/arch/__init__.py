"""Architecture adapters: the only code that names a model family's modules.

``register_arch(Adapter, model_types=(...))`` registers an adapter class (duplicates are refused);
``adapter_for(model)`` picks it by ``model.config.model_type``. ``supported_model_types()`` and
``FAMILY_MODULES`` are torch-free, so a ``--dry-run`` preflight can check a model_type from its
metadata alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from prunelab.stages.core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from prunelab.stages.arch.base import ArchAdapter

# model_type → the module that registers its adapter (imported on first use; torch-free to read).
FAMILY_MODULES: dict[str, str] = {
    "llama": "prunelab.stages.arch.llama",
    "mistral": "prunelab.stages.arch.llama",
    "qwen2": "prunelab.stages.arch.qwen",
    "qwen3": "prunelab.stages.arch.qwen",
    "granite": "prunelab.stages.arch.granite",
    "phi3": "prunelab.stages.arch.phi3",
    "gemma2": "prunelab.stages.arch.gemma",
    "gemma3_text": "prunelab.stages.arch.gemma",
    "olmo2": "prunelab.stages.arch.olmo2",
    "mixtral": "prunelab.stages.arch.mixtral",
    "qwen3_moe": "prunelab.stages.arch.qwen3_moe",
    "qwen2_moe": "prunelab.stages.arch.qwen2_moe",
}
# Mixture-of-experts families (stages.arch.moe): expert and expert-channel units.
MOE_FAMILIES: tuple[str, ...] = ("mixtral", "qwen3_moe", "qwen2_moe")
# ... of which these run a dense shared expert beside the routed ones: its channels are the `mlp: true` units.
SHARED_EXPERT_FAMILIES: tuple[str, ...] = ("qwen2_moe",)
# Families whose adapter sets SUBLAYER_REMOVAL (the Llama layout: each sublayer's output added to the residual stream);
# torch-free for --dry-run, and tests/test_sublayers.py checks it against the adapters.
SUBLAYER_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2")
# model_types whose o_proj/down_proj cannot hold a compensation bias (checked by a test against the adapters).
NO_OUTPUT_BIAS: dict[str, tuple[str, ...]] = {"mistral": ("o", "down"), "qwen2": ("o", "down"), "qwen3": ("down",),
                                              "phi3": ("o", "down"), "gemma2": ("down",), "gemma3_text": ("down",),
                                              "olmo2": ("down",)}

ARCHS: Registry[Any] = Registry("architecture")

ADAPTER_REQUIREMENTS = (
    "an adapter (a subclass of stages.arch.base.ArchAdapter, registered with register_arch(Adapter, "
    "model_types=...) and listed in stages.arch.FAMILY_MODULES) says where the blocks, embeddings, final norm and "
    "head are, how to run one block on cached inputs, each layer's geometry, the members (module path, axis, index "
    "map) of every unit kind, the LoRA target modules and which projections can hold a compensation bias"
)


def register_arch(adapter: type[ArchAdapter], model_types: tuple[str, ...]) -> type[ArchAdapter]:
    """Register ``adapter`` for every model_type in ``model_types``; a name registered twice is an error."""
    for name in model_types:
        ARCHS.register(name, adapter)
    adapter.model_types = tuple(dict.fromkeys((*adapter.model_types, *model_types)))
    return adapter


def supported_model_types() -> list[str]:
    """Every model_type with an adapter, without importing torch."""
    return sorted(FAMILY_MODULES)


def unsupported_message(model_type: str | None) -> str:
    return (f"model_type {model_type!r} has no architecture adapter; supported families: "
            f"{', '.join(supported_model_types())}. To add one: {ADAPTER_REQUIREMENTS}")


def compensation_refusal(model_type: str | None) -> str | None:
    """Torch-free: why bias/optimal compensation cannot be saved for a family, or None."""
    from prunelab.stages.arch.base_names import LINEAR_NAMES

    if model_type in MOE_FAMILIES:
        return (f"model_type {model_type!r} is a mixture of experts: its experts' outputs have no bias and per-expert "
                "compensation is not implemented; use compensation: none")
    missing = NO_OUTPUT_BIAS.get(model_type or "", ())
    if not missing:
        return None
    names = " and ".join(LINEAR_NAMES[r] for r in missing)
    return (f"model_type {model_type!r}: transformers builds {names} without a bias, so the bias that bias/optimal "
            "compensation adds would be dropped by a vanilla from_pretrained reload (logits change); use "
            "compensation: none, or optimal with bias: false")


def sublayer_refusal(model_type: str | None, stage: Any) -> str | None:
    """Torch-free, for ``--dry-run``: a prune stage with ``units: sublayers``, or a score stage computing
    ``sublayer_cosine``, on a family whose layers cannot lose a sublayer — refused before the model loads."""
    wants = getattr(stage, "units", None) == "sublayers" if getattr(stage, "type", None) == "prune" else \
        "sublayer_cosine" in (getattr(stage, "criteria", None) or [])
    if not wants or model_type is None or model_type in SUBLAYER_FAMILIES:
        return None
    return (f"sublayer removal needs the Llama layout (each sublayer's output added to the residual stream); "
            f"model_type {model_type!r} is not one of {', '.join(SUBLAYER_FAMILIES)} — use units: blocks or width")


def moe_refusals(model_type: str | None, settings: Any) -> list[str]:
    """Torch-free, for ``--dry-run``: width settings that do not fit the family's MLP (expert units on a dense
    model; dense MLP channels without a shared expert, hidden channels, or layers of different widths on a mixture of
    experts), each with what to do."""
    units, moe = getattr(settings, "units", None), model_type in MOE_FAMILIES
    wants = [k for k in ("experts", "expert_channels") if getattr(settings, k, None) is not None]
    if wants and not moe:
        return [(f"{k}: model_type {model_type!r} has no experts (mixture-of-experts families: "
                 f"{', '.join(MOE_FAMILIES)}); remove it") for k in wants]
    if not moe:
        return []
    if units == "hidden":
        return [("units: hidden — hidden-channel pruning of mixture-of-experts models "
                 f"({model_type!r}) is not implemented (the fused expert tensors are not sliced); prune experts or "
                 "expert_channels instead")]
    if units == "width" and getattr(settings, "mlp", False) and model_type not in SHARED_EXPERT_FAMILIES:
        return [(f"mlp: true — the {model_type!r} MLP is a mixture of experts with no dense MLP channels (only "
                 f"{', '.join(SHARED_EXPERT_FAMILIES)} has a dense shared expert); set mlp: false and prune `experts` "
                 "and/or `expert_channels`")]
    dense = units == "width" and (getattr(settings, "attention", "none") != "none" or getattr(settings, "mlp", False))
    allocation = getattr(getattr(settings, "allocation", None), "type", "uniform")
    layers = getattr(settings, "layers", None)
    if dense and (allocation != "uniform" or layers is not None):
        what = f"layers: {list(layers)}" if layers is not None else f"allocation: {allocation}"
        return [(f"{what} — the layers of a mixture of experts ({model_type!r}) cannot differ in width (transformers "
                 "reads the head counts and MLP widths from the shared config; the prunelab loader does not rebuild MoE "
                 "layers); use allocation: uniform over every layer")]
    return []


def dense_mlp_layers(model_type: str | None, config: Any) -> list[int]:
    """Torch-free: the layers of a Qwen2-MoE ``config`` (a config object or config.json's mapping) that transformers
    builds with a plain dense MLP instead of the MoE block (``Qwen2MoeDecoderLayer``: listed in ``mlp_only_layers``,
    or skipped by ``decoder_sparse_step``); [] for every other family."""
    if model_type != "qwen2_moe":
        return []
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    only, step = set(get("mlp_only_layers") or ()), get("decoder_sparse_step") or 1
    experts = get("num_experts") or 0
    return [i for i in range(get("num_hidden_layers") or 0) if i in only or not (experts > 0 and (i + 1) % step == 0)]


def dense_moe_layers_refusal(model_type: str | None, dense: list[int]) -> str | None:
    """Torch-free: why a Qwen2-MoE config whose ``mlp_only_layers`` / ``decoder_sparse_step`` make some layers a plain
    dense MLP is not supported (None when every layer is a MoE layer, or the family is not Qwen2-MoE)."""
    if model_type != "qwen2_moe" or not dense:
        return None
    return (f"model_type 'qwen2_moe' with dense-MLP layers {dense} (mlp_only_layers / decoder_sparse_step): not "
            "supported — those layers' MLP has other module paths and another width (intermediate_size) than the "
            "shared expert, and removing blocks would renumber mlp_only_layers; prunelab supports Qwen2-MoE configs "
            "whose every layer is a MoE layer (mlp_only_layers: [], decoder_sparse_step: 1), as Qwen1.5-MoE-A2.7B's is")


def adapter_class(model_type: str | None) -> type[ArchAdapter]:
    if model_type not in FAMILY_MODULES:
        raise ValueError(unsupported_message(model_type))
    importlib.import_module(FAMILY_MODULES[model_type])
    return ARCHS.get(model_type)


def layer_adapter(layer: nn.Module) -> type[ArchAdapter]:
    """The adapter class of a lone decoder layer, from the config its attention keeps (Llama layout if none)."""
    for module in layer.modules():
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type is not None:
            return adapter_class(model_type)
    return adapter_class("llama")


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model``; a clear error for architectures without one."""
    return adapter_class(getattr(model.config, "model_type", None))(model)
