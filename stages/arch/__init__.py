"""Architecture adapters: the only code that names a model family's modules.

A family is one file here: at its top, one ``register_family(FamilyFacts(...))`` call with its torch-free facts
(model types, what it supports, which projections can hold a bias, engines, tiny-model config;
``stages.arch.facts``); below it, the adapter class, resolved from ``FamilyFacts.adapter`` when a model needs it
(``adapter_for(model)``, by ``model.config.model_type``). Every table the rest of prunelab reads
(``FAMILY_MODULES``, ``MOE_FAMILIES``, ``SUBLAYER_FAMILIES``, ``NO_OUTPUT_BIAS``, the tiny models and shapes, the
engines' families) is derived from the registered facts, so ``--dry-run`` checks a model_type from its metadata
alone, without torch. The package imports every module in this folder on import (``pkgutil``; the helper modules
in ``_NOT_FAMILIES`` aside), in name order, so the registered order — and every message listing families — is the
same whatever imported first; a test may ``register_family`` more at run time.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from prunelab.stages.arch.base_names import FUSED_NAMES, HEAD_NAME, LINEAR_NAMES, LORA_TARGETS
from prunelab.stages.arch.facts import FamilyFacts
from prunelab.stages.core.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from prunelab.stages.arch.base import ArchAdapter

ARCHS: Registry[FamilyFacts] = Registry("architecture")
# Modules here that are no family file: the adapter protocol and its shared parts (noop imports torch at import).
_NOT_FAMILIES = frozenset({"base", "base_names", "facts", "moe", "noop"})

ADAPTER_REQUIREMENTS = (
    "a family file in stages/arch/ (docs/families.md, 'How to add a family') registers its facts with "
    "register_family(FamilyFacts(model_types=..., adapter='module:Class', ...)) and defines the adapter (a subclass of "
    "stages.arch.base.ArchAdapter), which says where the blocks, embeddings, final norm and head are, how to run one "
    "block on cached inputs, each layer's geometry, the members (module path, axis, index map) of every unit kind, "
    "the LoRA target modules and which projections can hold a compensation bias"
)


def register_family(facts: FamilyFacts) -> FamilyFacts:
    """Register a family's facts under each of its model_types, all or none; a model_type registered twice is an
    error (peft's ``register_peft_method``: two files silently fighting over a name is a bug to see at import)."""
    taken = [t for t in facts.model_types if t in ARCHS]
    if taken:
        raise ValueError(f"architecture {taken[0]!r} is already registered (by {ARCHS.get(taken[0]).adapter}); "
                         f"{facts.adapter} cannot register it again")
    for name in facts.model_types:
        ARCHS.register(name, facts)
    return facts


def family_facts(model_type: str | None) -> FamilyFacts | None:
    """The registered facts of ``model_type`` (None: no family serves it). Torch-free."""
    return ARCHS.get(model_type) if model_type in ARCHS else None


def families() -> list[FamilyFacts]:
    """Every registered family once, in registration order."""
    return list({id(f): f for f in (ARCHS.get(t) for t in ARCHS)}.values())


def per_layer_families(engine: str) -> tuple[str, ...]:
    """The model_types whose per-layer widths and removed sublayers ``engine`` runs (llama.cpp as `deci`, vLLM as
    DeciLM: the Llama layout), from each family's ``FamilyFacts.per_layer_engines``. Torch-free; selection (what may
    vary per layer) and the GGUF writer (what it writes as deci) ask the same question here."""
    return tuple(t for f in families() for t in f.model_types if engine in f.per_layer_engines)


def _table(name: str) -> Any:
    """The tables older callers import by name, derived from the registered facts on every read (a family a test
    registers at run time is in them)."""
    types = list(ARCHS)
    if name == "FAMILY_MODULES":  # model_type → the module that defines its adapter
        return {t: ARCHS.get(t).adapter.partition(":")[0] for t in types}
    if name == "MOE_FAMILIES":  # mixture-of-experts families (stages.arch.moe): expert and expert-channel units
        return tuple(t for t in types if ARCHS.get(t).moe)
    if name == "SHARED_EXPERT_FAMILIES":  # ... that run a dense shared expert: its channels are the `mlp: true` units
        return tuple(t for t in types if ARCHS.get(t).shared_expert)
    if name == "SUBLAYER_FAMILIES":  # each sublayer's output added to the residual stream: a sublayer can go
        return tuple(t for t in types if ARCHS.get(t).sublayers)
    if name == "NO_OUTPUT_BIAS":  # model_types whose o_proj/down_proj cannot hold a compensation bias
        return {t: ARCHS.get(t).no_output_bias for t in types if ARCHS.get(t).no_output_bias}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __getattr__(name: str) -> Any:
    return _table(name)


def supported_model_types() -> list[str]:
    """Every model_type with an adapter, without importing torch."""
    return sorted(ARCHS)


def unsupported_message(model_type: str | None) -> str:
    return (f"model_type {model_type!r} has no architecture adapter; supported families: "
            f"{', '.join(supported_model_types())}. To add one: {ADAPTER_REQUIREMENTS}")


def compensation_refusal(model_type: str | None) -> str | None:
    """Torch-free: why bias/optimal compensation cannot be saved for a family, or None."""
    facts = family_facts(model_type)
    if facts is not None and facts.moe:
        return (f"model_type {model_type!r} is a mixture of experts: its experts' outputs have no bias and per-expert "
                "compensation is not implemented; use compensation: none")
    missing = facts.no_output_bias if facts is not None else ()
    if not missing:
        return None
    names = " and ".join(LINEAR_NAMES[r] for r in missing)
    return (f"model_type {model_type!r}: transformers builds {names} without a bias, so the bias that bias/optimal "
            "compensation adds would be dropped by a vanilla from_pretrained reload (logits change); use "
            "compensation: none, or optimal with bias: false")


def sublayer_refusal(model_type: str | None, stage: Any) -> str | None:
    """Torch-free, for ``--dry-run``: a prune stage with ``units: sublayers``, or a score stage computing
    a sublayer criterion (``sublayer_cosine``, ``sublayer_ppl``, ``sublayer_sleb``), on a family whose layers cannot
    lose a sublayer — refused before the model loads."""
    wants = getattr(stage, "units", None) == "sublayers" if getattr(stage, "type", None) == "prune" else \
        bool({"sublayer_cosine", "sublayer_ppl", "sublayer_sleb"} & set(getattr(stage, "criteria", None) or []))
    facts = family_facts(model_type)
    if not wants or model_type is None or (facts is not None and facts.sublayers):
        return None
    return (f"sublayer removal needs the Llama layout (each sublayer's output added to the residual stream); "
            f"model_type {model_type!r} is not one of {', '.join(_table('SUBLAYER_FAMILIES'))} — use units: blocks or "
            "width")


def moe_refusals(model_type: str | None, settings: Any) -> list[str]:
    """Torch-free, for ``--dry-run``: width settings that do not fit the family's MLP (expert units on a dense
    model; dense MLP channels without a shared expert, hidden channels, or layers of different widths on a mixture of
    experts), each with what to do."""
    facts = family_facts(model_type)
    units, moe = getattr(settings, "units", None), facts is not None and facts.moe
    wants = [k for k in ("experts", "expert_channels") if getattr(settings, k, None) is not None]
    if wants and not moe:
        return [(f"{k}: model_type {model_type!r} has no experts (mixture-of-experts families: "
                 f"{', '.join(_table('MOE_FAMILIES'))}); remove it") for k in wants]
    if not moe:
        return []
    if units == "hidden":
        return [("units: hidden — hidden-channel pruning of mixture-of-experts models "
                 f"({model_type!r}) is not implemented (the fused expert tensors are not sliced); prune experts or "
                 "expert_channels instead")]
    if units == "width" and getattr(settings, "mlp", False) and not facts.shared_expert:  # type: ignore[union-attr]
        return [(f"mlp: true — the {model_type!r} MLP is a mixture of experts with no dense MLP channels (only "
                 f"{', '.join(_table('SHARED_EXPERT_FAMILIES'))} has a dense shared expert); set mlp: false and prune "
                 "`experts` and/or `expert_channels`")]
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
    """Torch-free: the layers of ``config`` (a config object or config.json's mapping) that transformers builds with a
    plain dense MLP where the family's adapter expects its MoE block (``FamilyFacts.dense_mlp_layers``; Qwen2-MoE's
    ``mlp_only_layers`` / ``decoder_sparse_step``); [] for every other family."""
    facts = family_facts(model_type)
    if facts is None or facts.dense_mlp_layers is None:
        return []
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    return facts.dense_mlp_layers(get)


def dense_moe_layers_refusal(model_type: str | None, dense: list[int]) -> str | None:
    """Torch-free: why a MoE config whose ``mlp_only_layers`` / ``decoder_sparse_step`` make some layers a plain dense
    MLP is not supported by a family that cannot hold them (None when there are none)."""
    facts = family_facts(model_type)
    if facts is None or facts.dense_mlp_layers is None or not dense:
        return None
    return (f"model_type {model_type!r} with dense-MLP layers {dense} (mlp_only_layers / decoder_sparse_step): not "
            "supported — those layers' MLP has other module paths and another width (intermediate_size) than the "
            "shared expert, and removing blocks would renumber mlp_only_layers; prunelab supports configs whose every "
            "layer is a MoE layer (mlp_only_layers: [], decoder_sparse_step: 1), as Qwen1.5-MoE-A2.7B's is")


def lora_target_choices() -> tuple[str, ...]:
    """Torch-free: the module names a recipe's LoRA ``target_modules`` may list — every decoder linear of the Llama
    layout, the fused names some families use instead, and the LM head."""
    return (*LORA_TARGETS, *FUSED_NAMES, HEAD_NAME)


def _bind(facts: FamilyFacts) -> type[ArchAdapter]:
    """The adapter class ``facts`` names, carrying the facts it derives its class-level answers from (model_types,
    SUBLAYER_REMOVAL, BIAS_HOLDERS), so an adapter never restates them."""
    module, _, name = facts.adapter.partition(":")
    adapter = getattr(importlib.import_module(module), name, None)
    if adapter is None:
        raise ValueError(f"FamilyFacts.adapter {facts.adapter!r}: {module} defines no {name}; name the ArchAdapter "
                         "subclass the family file defines")
    bound = adapter.__dict__.get("FACTS")
    if bound is not None and bound != facts:
        raise ValueError(f"{facts.adapter} already serves {bound.model_types}; give {facts.model_types} an adapter "
                         "class of its own (a subclass is enough)")
    adapter.FACTS = facts
    adapter.model_types = facts.model_types
    adapter.SUBLAYER_REMOVAL = facts.sublayers
    adapter.BIAS_HOLDERS = facts.bias_holders()
    return adapter


def adapter_class(model_type: str | None) -> type[ArchAdapter]:
    facts = family_facts(model_type)
    if facts is None:
        raise ValueError(unsupported_message(model_type))
    return _bind(facts)


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


def _discover() -> None:
    """Import every family file in this folder (name order): each registers its facts; then bind their adapters."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _NOT_FAMILIES and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for facts in families():
        _bind(facts)


_discover()
