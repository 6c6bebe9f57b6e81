"""Typed settings of a selection: what to remove (blocks, width units, hidden channels), how much, and the
allocation and compensation rules of width pruning. Torch-free: validating a recipe imports this.

Each mode's settings are their own class, so a setting of another mode is an error naming it. ``allocation``
and ``compensation`` are tagged by ``type`` and carry their own settings; a bare name is short for that
type with its defaults (``allocation: global`` ≡ ``allocation: {type: global}``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from prunelab.stages import criteria as _criteria  # noqa: F401  (registers every criterion the checks read)
from prunelab.stages.core.config import StrictModel
from prunelab.stages.core.registry import VariantRegistry, allowed_keys, register_variant, validate_as
from prunelab.stages.criteria import HIDDEN_CRITERIA
from prunelab.stages.criteria.registry import criteria_for
from prunelab.stages.selection.targets import blocks_for_ratio, hidden_channels_to_remove

# The variants a plan records (allocations, compensations, expert units) live below selection, in the plan's room;
# re-exported here, where a recipe's prune settings are read.
from prunelab.stages.surgery.targets import (
    ALLOCATIONS,
    COMPENSATIONS,
    AlphaAllocation,
    Allocation,
    BiasCompensation,
    Compensation,
    ExpertUnits,
    GlobalAllocation,
    NoCompensation,
    OptimalCompensation,
    OwlAllocation,
    UniformAllocation,
)

__all__ = ["ALLOCATIONS", "COMPENSATIONS", "AlphaAllocation", "Allocation", "BiasCompensation",
           "BlocksSettings", "Compensation", "ExpertUnits", "GlobalAllocation", "HiddenSettings", "NoCompensation",
           "OptimalCompensation", "OwlAllocation", "SELECTIONS", "SublayersSettings", "UniformAllocation", "WidthSettings",
           "allowed_keys", "validate_as", "validate_selection"]


def _check_scores(criterion: str, unit: str, field: str) -> None:
    """``criterion`` must be a width criterion that scores ``unit`` (experts, expert_channels, kv_groups, ...)."""
    registry = criteria_for("width")
    if criterion not in registry:
        raise ValueError(f"{field}: {registry.unknown(criterion, 'width criterion')}")
    if unit not in registry.get(criterion).units:
        able = [n for n in registry.names() if unit in registry.get(n).units]
        raise ValueError(f"{field}: criterion {criterion!r} does not score {unit.replace('_', ' ')}; choose from {', '.join(able)}")


# ----------------------------------------------------------------------------- what to remove, and how much
class _Selection(StrictModel):
    scored_units: ClassVar[Literal["blocks", "width"]] = "width"  # the `units` of the score stage that feeds it
    criterion: str = Field(..., description="which computed criterion decides (see `score`)")
    ratio: float | None = Field(
        None, gt=0, lt=1, description="remove this fraction of ALL parameters (embeddings included, as Shortened LLaMA counts)"
    )

    @model_validator(mode="after")
    def _known_criterion(self) -> _Selection:
        registry = criteria_for(self.scored_units)
        if self.criterion not in registry:
            raise ValueError(registry.unknown(self.criterion, f"{self.scored_units} criterion"))
        return self


class _WidthTarget(_Selection):
    layer_ratio: float | None = Field(
        None, gt=0, lt=1, description="fraction of each layer's units to remove (LLM-Pruner's per-layer ratio)"
    )

    @model_validator(mode="after")
    def _one_target(self) -> _WidthTarget:
        if (self.ratio is None) == (self.layer_ratio is None):
            raise ValueError("give exactly one width target: `ratio` (of all parameters) or `layer_ratio` (of each layer's units)")
        return self


class BlocksSettings(_Selection):
    """Remove whole decoder blocks."""

    scored_units: ClassVar[Literal["blocks", "width"]] = "blocks"
    units: Literal["blocks"] = Field("blocks", description="remove decoder blocks")
    num_blocks: int | None = Field(None, ge=1, description="remove exactly this many blocks")
    rounding: Literal["nearest", "floor", "ceil"] = Field("nearest", description="how a ratio becomes a whole number of blocks")

    @model_validator(mode="after")
    def _one_target(self) -> BlocksSettings:
        if (self.num_blocks is None) == (self.ratio is None):
            raise ValueError("give exactly one target: `num_blocks` (a count) or `ratio` (a fraction of parameters in (0, 1))")
        return self

    def check_model(self, num_layers: int, total_params: int | None = None, block_params: float | None = None,
                    geometries: list[Any] | None = None) -> list[str]:
        """Problems only visible once the model's size is known (checked before any heavy work)."""
        if self.num_blocks is not None and self.num_blocks >= num_layers:
            return [f"num_blocks={self.num_blocks} but the model has {num_layers} blocks; choose at most {num_layers - 1}"]
        if self.ratio is not None and total_params and block_params:
            k = blocks_for_ratio(self.ratio, total_params, block_params, self.rounding)
            if k >= num_layers:
                return [f"ratio={self.ratio} would remove {k} of {num_layers} blocks; choose a smaller ratio"]
            if k < 1:
                return [f"ratio={self.ratio} is less than one block ({block_params / total_params:.3f}); raise it or use num_blocks"]
        return []


class WidthSettings(_WidthTarget):
    """Remove attention heads / KV groups and MLP channels inside the layers; on mixture-of-experts models also
    whole experts (``experts``) and channels inside every expert (``expert_channels``)."""

    LATER_FIELDS: ClassVar[dict[str, Any]] = {"experts": None, "expert_channels": None, "engines": ["transformers"],
                                              "round_to": 1}

    units: Literal["width"] = Field("width", description="remove heads / KV groups / MLP channels")
    allocation: Allocation = Field(default_factory=UniformAllocation, description="how the target spreads over layers: "
                                   "uniform | global | owl {m, lambda} | alpha {epsilon} (the last two combine with any criterion)")
    layers: tuple[int, int] | None = Field(None, description="[start, end) layer range to prune; LLM-Pruner keeps the first and last layers")
    attention: Literal["kv_group", "q_head", "none"] = Field("kv_group", description="attention unit — head_dim never changes")
    mlp: bool = Field(True, description="prune MLP channels")
    compensation: Compensation = Field(default_factory=NoCompensation, description="repair of the removed inputs of "
                                       "the attention/MLP output projections: none | bias (FLAP) | optimal {damping, bias} (APT/OBS)")
    experts: ExpertUnits | None = Field(None, description="mixture of experts: {ratio, criterion} — whole experts "
                                        "(router row + weights) removed in every MoE layer")
    expert_channels: ExpertUnits | None = Field(None, description="mixture of experts: {ratio, criterion} — "
                                                "intermediate channels removed inside every expert")
    engines: list[Literal["transformers", "llama.cpp", "vllm"]] = Field(
        default_factory=lambda: ["transformers"], min_length=1, description="engines the pruned model must run in; "
        "selection honours what they run (stages.selection.engines): transformers — everything the prunelab loader "
        "runs; llama.cpp — per-layer widths for Llama-layout families (as `deci`), uniform widths for the others; "
        "vllm — the same, and query heads uniform across layers (attention pruned alike in every layer, MLP per layer)")
    round_to: int = Field(1, ge=1, description="kept MLP widths are multiples of this (Torch-Pruning's round_to; "
                          "Minitron keeps multiples of 64): the highest-scoring channels kept, the target then met as "
                          "closely as those steps allow; heads are whole head_dim units already and are not rounded")

    def moe_units(self) -> dict[str, ExpertUnits]:
        """The expert unit kinds this prune removes, by their score key."""
        return {k: u for k, u in (("experts", self.experts), ("expert_channels", self.expert_channels)) if u is not None}

    def dense_units(self) -> bool:
        """Whether attention units or MLP channels are pruned (they need the top-level target)."""
        return self.attention != "none" or self.mlp

    def criteria(self) -> list[str]:
        """Every criterion this prune reads (the score stage computes them)."""
        return list(dict.fromkeys([self.criterion, *(u.criterion or self.criterion for u in self.moe_units().values())]))

    @model_validator(mode="after")
    def _one_target(self) -> WidthSettings:
        if not self.dense_units() and self.moe_units():
            if self.ratio is not None or self.layer_ratio is not None:
                raise ValueError("attention: none and mlp: false prune experts only: their `ratio` lives in `experts` / "
                                 "`expert_channels`; remove the top-level ratio / layer_ratio")
        elif (self.ratio is None) == (self.layer_ratio is None):
            raise ValueError("give exactly one width target: `ratio` (of all parameters) or `layer_ratio` (of each layer's units)")
        return self

    @model_validator(mode="after")
    def _moe(self) -> WidthSettings:
        for key, units in self.moe_units().items():
            units.criterion = units.criterion or self.criterion
            _check_scores(units.criterion, key, f"{key}.criterion")
        if self.dense_units():
            for unit, on in (("kv_groups", self.attention != "none"), ("mlp", self.mlp)):
                if on:
                    _check_scores(self.criterion, unit, "criterion")
        if self.moe_units() and self.layers is not None:
            raise ValueError("experts and expert_channels are removed in every MoE layer (transformers reads one expert "
                             "count and width from the config); remove `layers`")
        if self.moe_units() and self.compensation.type != "none":
            raise ValueError("compensation repairs dense output projections; with experts / expert_channels use compensation: none")
        return self

    @field_validator("attention", mode="before")
    @classmethod
    def _attention(cls, v: Any) -> Any:
        if isinstance(v, str) and (v == "head_dim" or "dim" in v):
            raise ValueError("head_dim never changes: prune whole heads with attention: kv_group or q_head")
        if v not in ("kv_group", "q_head", "none"):
            raise ValueError(f"attention {v!r}: choose kv_group (whole GQA groups), q_head (query heads inside groups) or none")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> WidthSettings:
        if self.allocation.ranks_globally and self.layer_ratio is not None:
            raise ValueError(f"allocation: {self.allocation.type} needs `ratio` (a parameter budget), not layer_ratio")
        if self.allocation.ranks_globally and self.attention == "q_head":
            raise ValueError("allocation: global ranks whole KV groups; use attention: kv_group or allocation: uniform")
        if self.attention == "none" and not self.mlp and not self.moe_units():
            raise ValueError("nothing to prune: enable mlp, choose an attention unit, or set experts / expert_channels")
        if self.round_to > 1 and not self.mlp:
            raise ValueError(f"round_to={self.round_to} rounds kept MLP widths, but mlp: false; remove round_to or set mlp: true")
        if len(set(self.engines)) != len(self.engines):
            raise ValueError(f"engines {self.engines} names an engine twice; list each once")
        if self.layers is not None and not 0 <= self.layers[0] < self.layers[1]:
            raise ValueError(f"layers {list(self.layers)} must be [start, end) with 0 <= start < end")
        return self

    def check_model(self, num_layers: int, total_params: int | None = None, block_params: float | None = None,
                    geometries: list[Any] | None = None) -> list[str]:
        if self.layers is not None and self.layers[1] > num_layers:
            return [f"layers {list(self.layers)} reach past the model's {num_layers} layers; end at most {num_layers}"]
        if geometries and self.mlp and self.round_to > 1:
            from prunelab.stages.selection.width import WidthTargetError, check_round_to  # lazy: torch-free

            start, end = self.layers or (0, num_layers)
            try:
                check_round_to(self.round_to, geometries, list(range(start, end)))
            except WidthTargetError as exc:
                return [str(exc)]
        if geometries and self.layer_ratio is not None:
            from prunelab.stages.selection.width import WidthTargetError, uniform_layer  # lazy: torch-free

            start, end = self.layers or (0, num_layers)
            for i in range(start, end):
                g = geometries[i]
                dummy = {"q_heads": [0.0] * g.n_q, "kv_groups": [0.0] * g.n_kv, "mlp": [0.0] * g.intermediate}
                try:
                    uniform_layer(dummy, g, self.layer_ratio, self.attention, self.mlp, i,
                                  getattr(self.allocation, "counts", "nearest"), self.round_to)
                except WidthTargetError as exc:
                    return [f"layer_ratio={self.layer_ratio}: {exc}"]
        return []


class HiddenSettings(_WidthTarget):
    """Remove hidden (residual-stream) channels — LLM-Pruner's channel mode: every embedding, norm, projection and
    the head shrink together; heads and MLP channels stay."""

    units: Literal["hidden"] = Field("hidden", description="remove hidden (residual-stream) channels")
    norm_rescale: bool = Field(
        True, description="scale kept RMSNorm weights by sqrt(d/d') and eps by d/d' so the pruned model equals the "
        "masked one (zeroed channels) exactly; false slices only, as LLM-Pruner does (every norm's scale then shifts)"
    )

    @model_validator(mode="after")
    def _hidden_criterion(self) -> HiddenSettings:
        if self.criterion not in HIDDEN_CRITERIA:
            raise ValueError(f"criterion {self.criterion!r} has no hidden-channel score; choose from {', '.join(HIDDEN_CRITERIA)}")
        return self

    def check_model(self, num_layers: int, total_params: int | None = None, block_params: float | None = None,
                    geometries: list[Any] | None = None) -> list[str]:
        if geometries and self.layer_ratio is not None:
            d = geometries[0].hidden
            if hidden_channels_to_remove(d, geometries[0].n_q, self.layer_ratio * d) >= d:
                return [f"layer_ratio={self.layer_ratio} would remove all {d} hidden channels; lower it"]
        return []


class SublayersSettings(_Selection):
    """Remove whole attention and/or MLP sublayers (He et al., arXiv 2406.15786: Attention Drop, MLP Drop, Joint
    Layer Drop), lowest importance first (``sublayer_cosine``; removal cost: ``sublayer_ppl``, ``sublayer_sleb``).
    The block stays, with a no-op in place of each removed sublayer (0 heads / 0 MLP channels in
    ``prunelab_layer_shapes``)."""

    scored_units: ClassVar[Literal["blocks", "width"]] = "blocks"  # a depth criterion scores both sublayers per block
    units: Literal["sublayers"] = Field("sublayers", description="remove whole attention / MLP sublayers")
    sublayers: Literal["attention", "mlp", "both"] = Field(
        "attention", description="which sublayers may go: attention (the paper's Attention Drop), mlp, or both "
        "(one joint ranking of attention and MLP scores, as LLM-Drop's target_layer: all)")
    num_sublayers: int | None = Field(None, ge=1, description="remove exactly this many sublayers")

    @model_validator(mode="after")
    def _one_target(self) -> SublayersSettings:
        if (self.num_sublayers is None) == (self.ratio is None):
            raise ValueError("give exactly one target: `num_sublayers` (a count) or `ratio` (a fraction of parameters in (0, 1))")
        return self

    def check_model(self, num_layers: int, total_params: int | None = None, block_params: float | None = None,
                    geometries: list[Any] | None = None) -> list[str]:
        """A layer keeps at least one sublayer of a kind somewhere: at most L − 1 of one kind (2L − 2 for both)."""
        most = num_layers - 1 if self.sublayers != "both" else 2 * num_layers - 2
        if self.num_sublayers is not None and self.num_sublayers > most:
            return [f"num_sublayers={self.num_sublayers} but at most {most} {self.sublayers} sublayers of a "
                    f"{num_layers}-layer model may go (one of each kind stays); choose at most {most}"]
        return []


# What a prune removes, chosen by `units` (blocks when absent): each mode's settings, and its plan maker
# ``(result, settings, model, stats, results, calibration) -> (plan, side tensors)``, imported when a plan is made.
SELECTIONS = VariantRegistry("units", base=_Selection, key="units", default="blocks", shorthand=False)
register_variant(SELECTIONS, BlocksSettings, "prunelab.stages.selection.blocks:blocks_plan")
register_variant(SELECTIONS, WidthSettings, "prunelab.stages.selection.planning:make_width_plan")
register_variant(SELECTIONS, HiddenSettings, "prunelab.stages.selection.planning:hidden_plan")
register_variant(SELECTIONS, SublayersSettings, "prunelab.stages.selection.sublayers:sublayers_plan")

# Why a key of one mode is refused in another (the key check names the key; this says what to do instead).
_WIDTH_ONLY = "layer_ratio, allocation and compensation are width settings; set units: width"
_HIDDEN_SPAN = "hidden channels span every layer: allocation, layers and compensation do not apply; remove them"
_HIDDEN_ALONE = "hidden channels are pruned on their own (LLM-Pruner's channel mode): attention and mlp do not apply; remove them"
_ROUNDING = "rounding is a blocks setting (width and hidden targets round to the nearest unit); remove it"
NOT_APPLICABLE: dict[str, dict[str, str]] = {
    "blocks": {"layer_ratio": _WIDTH_ONLY, "allocation": _WIDTH_ONLY, "compensation": _WIDTH_ONLY,
               **dict.fromkeys(("layers", "attention", "mlp", "experts", "expert_channels", "engines", "round_to"),
                               "{key} is a width setting; set units: width"),
               "norm_rescale": "norm_rescale is a hidden-channel setting; set units: hidden"},
    "width": {"num_blocks": "num_blocks is a depth target; for width give `ratio` or `layer_ratio`", "rounding": _ROUNDING,
              "norm_rescale": "norm_rescale is a hidden-channel setting; set units: hidden"},
    "hidden": {"num_blocks": "num_blocks is a depth target; for hidden channels give `ratio` or `layer_ratio`",
               "rounding": _ROUNDING, "allocation": _HIDDEN_SPAN, "layers": _HIDDEN_SPAN, "compensation": _HIDDEN_SPAN,
               "attention": _HIDDEN_ALONE, "mlp": _HIDDEN_ALONE, "experts": _HIDDEN_ALONE,
               "expert_channels": _HIDDEN_ALONE,
               **dict.fromkeys(("engines", "round_to"), "{key} is a setting of units: width (heads and MLP channels); remove it")},
}


NOT_APPLICABLE["sublayers"] = {
    **dict.fromkeys(("num_blocks", "rounding"), "{key} is a depth setting; for sublayers give `num_sublayers` or `ratio`"),
    **dict.fromkeys(("layer_ratio", "allocation", "compensation", "layers", "attention", "mlp", "experts",
                     "expert_channels", "engines", "round_to"),
                    "{key} is a width setting; for sublayers choose `sublayers: attention | mlp | both`"),
    "norm_rescale": "norm_rescale is a hidden-channel setting; set units: hidden"}
for _units in ("blocks", "width", "hidden"):
    NOT_APPLICABLE[_units].update(dict.fromkeys(("sublayers", "num_sublayers"), "{key} is a setting of units: sublayers"))


def validate_selection(data: Any, variants: Mapping[str, type[BaseModel]], explain_old: Callable[[str, str], str | None]) -> Any:
    """Validate prune settings as the variant their ``units`` names (blocks by default), every key that does not
    apply to that mode reported by name with what to do instead (``explain_old`` covers the version-1 keys)."""
    if not isinstance(data, dict):
        raise ValueError("prune settings are a mapping: type, units, criterion and the settings of that mode")  # noqa: TRY004
    units = data.get("units", "blocks")
    cls = variants.get(units) if isinstance(units, str) else None  # a list or mapping is not a key (no TypeError)
    if cls is None:
        raise ValueError(f"units {units!r}: choose {' | '.join(variants)}")
    explain = {k: m.format(key=k) for k, m in NOT_APPLICABLE.get(units, {}).items()}
    explain.update({k: msg for k in data if (msg := explain_old(k, units))})
    return validate_as(cls, data, explain)
