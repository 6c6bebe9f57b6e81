"""Architecture adapters: the only code that names a model family's modules.

``register_arch(Adapter, model_types=(...))`` registers an adapter class (duplicates are refused);
``adapter_for(model)`` picks it by ``model.config.model_type``. ``supported_model_types()`` and
``FAMILY_MODULES`` are torch-free, so a ``--dry-run`` preflight can check a model_type from its
metadata alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stages.core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from stages.arch.base import ArchAdapter

# model_type → the module that registers its adapter (imported on first use; torch-free to read).
FAMILY_MODULES: dict[str, str] = {
    "llama": "stages.arch.llama",
    "mistral": "stages.arch.llama",
    "qwen2": "stages.arch.qwen",
    "qwen3": "stages.arch.qwen",
    "granite": "stages.arch.granite",
    "phi3": "stages.arch.phi3",
    "gemma2": "stages.arch.gemma",
    "gemma3_text": "stages.arch.gemma",
    "olmo2": "stages.arch.olmo2",
    "mixtral": "stages.arch.mixtral",
    "qwen3_moe": "stages.arch.qwen3_moe",
}
# Mixture-of-experts families (stages.arch.moe): expert and expert-channel units, no dense MLP channels.
MOE_FAMILIES: tuple[str, ...] = ("mixtral", "qwen3_moe")
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
    from stages.arch.base_names import LINEAR_NAMES

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


def moe_refusals(model_type: str | None, settings: Any) -> list[str]:
    """Torch-free, for ``--dry-run``: width settings that do not fit the family's MLP (expert units on a dense
    model; dense MLP channels, hidden channels or a layer range on a mixture of experts), each with what to do."""
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
    if units == "width" and getattr(settings, "mlp", False):
        return [(f"mlp: true — the {model_type!r} MLP is a mixture of experts with no dense MLP channels; set "
                 "mlp: false and prune `experts` and/or `expert_channels`")]
    return []


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
