"""A model family's torch-free facts: what ``--dry-run``, recipe validation, the tiny models and the engines need to
know about a family without building it — registered in one call from the family's own file.

Why the facts sit in the family file itself (not a second module per family): adding a family is one new file
(issue 27). That file stays importable without torch because the adapter machinery reaches torch through
:func:`lazy_module` (the ``lazy_loader`` pattern of scientific-python's SPEC 1): ``torch`` is imported the first time
an adapter touches it, i.e. when a model is at hand, never when the package lists its families' facts.

    register_family(FamilyFacts(model_types=("llama",), adapter="prunelab.stages.arch.llama:LlamaAdapter",
                                sublayers=True, engines={"llama.cpp": "llama"}, per_layer_engines=("llama.cpp", "vllm"),
                                tiny={"head_dim": 16}, tiny_layers=6))
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from prunelab.stages.core.config import StrictModel

OUTPUT_ROLES = ("o", "down")  # the output projections a compensation bias would live in


class FamilyFacts(StrictModel):
    """One family (one adapter class) as prunelab sees it before any weights load."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)

    model_types: tuple[str, ...] = Field(min_length=1, description="config.json model_type values this adapter serves")
    adapter: str = Field(description="'module:Class' of the ArchAdapter subclass, imported when a model needs it")
    moe: bool = Field(False, description="mixture of experts: expert and expert-channel units (stages.arch.moe)")
    shared_expert: bool = Field(False, description="MoE with a dense shared expert: its channels are the mlp units")
    sublayers: bool = Field(False, description="each sublayer's output is added to the residual stream, so a sublayer "
                                                "can be removed (units: sublayers, sublayer_cosine)")
    no_output_bias: tuple[Literal["o", "down"], ...] = Field(
        (), description="output projections transformers builds without a bias (bias/optimal compensation refused)")
    engines: Mapping[Literal["llama.cpp", "vllm"], str] = Field(
        default_factory=dict, description="engine → the architecture a uniform model of this family is exported under "
                                          "(llama.cpp: the GGUF general.architecture stages.io.gguf_export writes); an "
                                          "engine not listed has no verified export of its own")
    per_layer_engines: tuple[Literal["llama.cpp", "vllm"], ...] = Field(
        (), description="engines that run layers of different widths (as llama.cpp deci / vLLM DeciLM)")
    qkv_bias: bool | str = Field(False, description="q/k/v always have a bias (True), or the config key that says so "
                                                    "(absent: true); o's bias follows attention_bias")
    qk_norm: Literal["none", "head", "projection"] = Field(
        "none", description="RMSNorms on queries and keys: per head (over head_dim) or over the whole projection")
    layer_norms: int = Field(2, ge=1, description="hidden-sized norms per decoder layer")
    dense_mlp_layers: Callable[[Callable[..., Any]], list[int]] | None = Field(
        None, description="MoE: the layers a config (read through get(key, default)) builds with a dense MLP instead")
    tiny: Mapping[str, Any] = Field(
        default_factory=dict, description="what the tiny random model's config sets beyond stages.io.tiny.tiny_llama's "
                                          "defaults ('tie': tied embeddings); exercises what makes the family differ")
    tiny_layers: int = Field(4, ge=2, description="blocks of the tiny-random-<model_type> model")

    @field_validator("adapter")
    @classmethod
    def _module_colon_class(cls, value: str) -> str:
        module, _, name = value.partition(":")
        if not module or not name.isidentifier():
            raise ValueError(f"adapter {value!r}: give 'package.module:ClassName' (the ArchAdapter subclass)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FamilyFacts:
        if self.shared_expert and not self.moe:
            raise ValueError("shared_expert: true needs moe: true (a shared expert sits beside routed experts)")
        if self.dense_mlp_layers is not None and not self.moe:
            raise ValueError("dense_mlp_layers is for mixture-of-experts families (moe: true)")
        if self.moe and self.sublayers:
            raise ValueError("sublayers: true is not implemented for mixture-of-experts families; set it false")
        return self

    def bias_holders(self) -> dict[str, bool]:
        """Whether each output projection can hold a bias a vanilla reload keeps (the adapters' default answer)."""
        return {role: role not in self.no_output_bias for role in OUTPUT_ROLES}


class _LazyModule(types.ModuleType):
    """A module imported on first attribute access; each attribute is kept once read."""

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


def lazy_module(name: str) -> types.ModuleType:
    """``name`` as a module object that imports it on first use: the adapters' torch, so that importing a family
    file (to read its facts) costs no torch import. Type checkers see the real module (``TYPE_CHECKING`` imports)."""
    return sys.modules.get(name) or _LazyModule(name)
