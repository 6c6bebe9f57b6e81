"""What a width plan's target records beside its ratios: the allocation that spread it over layers, the compensation
that repaired what was removed, and the expert units. Torch-free: recipes and ``plan.json`` validate with it.

Each allocation and compensation is a variant registered in :data:`ALLOCATIONS` / :data:`COMPENSATIONS`
(``prunelab.stages.core.registry``) with its config class and its implementation, imported on first use:

- an allocation's implementation is ``(model, stats, layers, settings) -> (offsets, record)``: per-layer ratio
  offsets around the target (0 outside ``layers``) and extra plan fields to record (``{"layer_alpha": ...}``);
  ``global`` ranks units across layers instead (``ranks_globally``); ``uniform`` has no implementation (no offsets);
- a compensation's is ``(model, removed, stats, settings) -> side tensors by parameter name``; ``none`` has none.

They live here, below selection, because the plan (``prunelab.stages.surgery.plan``) records them and selection
imports the plan: selection → surgery, never back. A new variant is one ``register_variant`` call (a test does it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from prunelab.stages.core.config import StrictModel
from prunelab.stages.core.registry import VariantRegistry, register_variant, tagged_union


class _Tagged(StrictModel):
    type: str
    what: ClassVar[str] = ""

    def describe(self) -> str:
        """A few words for the plan's summary (``prunelab.stages.surgery.plan``)."""
        return f"{self.type} {self.what}"


# ----------------------------------------------------------------------------- allocation: how much each layer loses
class AllocationBase(_Tagged):
    """The base of every allocation's settings."""

    what: ClassVar[str] = "allocation"
    ranks_globally: ClassVar[bool] = False  # one ranking across layers (select_global) instead of per-layer ratios


ALLOCATIONS = VariantRegistry("allocation", base=AllocationBase)


class UniformAllocation(AllocationBase):
    """Every layer in range loses the same fraction of its units (the result keeps a vanilla config)."""

    type: Literal["uniform"] = "uniform"
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"counts": "nearest"}  # added later: left out of dumps at its default
    counts: Literal["nearest", "llm_pruner"] = Field(
        "nearest", description="how a layer's fraction r becomes whole units: nearest (round r·n); llm_pruner (the "
        "official code's rule per coupled group: remove n − int(n·(1 − r)) MLP channels, and "
        "(n_kv·hd − int(n_kv·hd·(1 − r))) // hd KV groups)"
    )


class GlobalAllocation(AllocationBase):
    """One ranking across layers, each unit weighted by its parameter cost (FLAP's adaptive structure, AL-AM)."""

    type: Literal["global"] = "global"
    ranks_globally: ClassVar[bool] = True


class OwlAllocation(AllocationBase):
    """OWL's outlier-weighted layer ratios (arXiv 2310.05175): layers richer in outliers are pruned less."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    type: Literal["owl"] = "owl"
    m: float = Field(5.0, gt=0, description="a score is an outlier above M × the layer mean")
    lambda_: float = Field(0.08, ge=0, lt=0.5, alias="lambda", description="layer ratios span r ± lambda")

    def describe(self) -> str:
        return f"OWL allocation (M = {self.m:g}, λ = {self.lambda_:g})"


class AlphaAllocation(AllocationBase):
    """AlphaPruning's heavy-tail (α) layer ratios (arXiv 2410.10912): heavier-tailed layers are pruned less."""

    type: Literal["alpha"] = "alpha"
    epsilon: float = Field(0.08, ge=0, lt=0.5, description="layer ratios span r ± epsilon")

    def describe(self) -> str:
        return f"AlphaPruning allocation (ε = {self.epsilon:g})"


register_variant(ALLOCATIONS, UniformAllocation)
register_variant(ALLOCATIONS, GlobalAllocation)
register_variant(ALLOCATIONS, OwlAllocation, "prunelab.stages.selection.owl:owl_allocation")
register_variant(ALLOCATIONS, AlphaAllocation, "prunelab.stages.selection.alpha:alpha_allocation")
Allocation = tagged_union(ALLOCATIONS)


# ----------------------------------------------------------------------------- compensation: repairing what was removed
class CompensationBase(_Tagged):
    """The base of every compensation's settings."""

    what: ClassVar[str] = "compensation"


COMPENSATIONS = VariantRegistry("compensation", base=CompensationBase)


class NoCompensation(CompensationBase):
    type: Literal["none"] = "none"

    def describe(self) -> str:
        return "no compensation"


class BiasCompensation(CompensationBase):
    """FLAP's bias (arXiv 2312.11983, Eq. 8): the removed channels' mean output folded into the output bias."""

    type: Literal["bias"] = "bias"


class OptimalCompensation(CompensationBase):
    """The APT/OBS closed-form update of the kept o_proj/down_proj columns on calibration inputs (arXiv 2410.15567)."""

    type: Literal["optimal"] = "optimal"
    damping: float = Field(0.01, gt=0, description="λ = damping × mean(diag XᵀX) added to XᵀX")
    bias: bool = Field(True, description="also solve for the output bias (then never worse than FLAP's bias on "
                       "calibration data); false: weights only, as in APT")

    def describe(self) -> str:
        return f"optimal compensation (damping {self.damping:g}, {'with' if self.bias else 'without'} bias)"


register_variant(COMPENSATIONS, NoCompensation)
register_variant(COMPENSATIONS, BiasCompensation, "prunelab.stages.surgery.compensation:compensate_bias")
register_variant(COMPENSATIONS, OptimalCompensation, "prunelab.stages.surgery.compensation:compensate_optimal")
Compensation = tagged_union(COMPENSATIONS)


# ----------------------------------------------------------------------------- mixture of experts
class ExpertUnits(StrictModel):
    """Experts (or channels inside every expert) of each mixture-of-experts layer to remove, and who scores them."""

    criterion: str | None = Field(None, description="width criterion that scores these units (default: the prune's "
                                  "`criterion`): reap | expert_frequency_norm | magnitude | random for experts; "
                                  "magnitude | random | wanda_sp | flap for expert channels")
    ratio: float = Field(..., gt=0, lt=1, description="fraction of each MoE layer's experts (of each expert's channels) "
                         "to remove, rounded to the nearest count; the same count in every layer and expert, since "
                         "transformers reads one expert count and one expert width from the config")

    def describe(self, what: str) -> str:
        return f"{self.ratio:g} of {what} by `{self.criterion}`"
