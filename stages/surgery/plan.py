"""The plan: what selection decided and surgery executes — ``DepthPlan | WidthPlan | HiddenPlan``, tagged by ``kind``.

``plan.json`` is the plan's JSON (``to_json``), readable and versioned; ``load_plan`` reads it back, including
plans written by version 1, where a hidden-channel plan was ``kind: width`` with a ``hidden`` section.
``describe()`` is THE human summary of a plan (CLI summary, ``report.md``, model card); ``details()`` adds its
tables (markdown) where a page has room for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from prunelab.stages.core.migrate import fold
from prunelab.stages.surgery.targets import Allocation, Compensation, ExpertUnits, NoCompensation, UniformAllocation

PLAN_VERSION = 2


class PlanError(ValueError):
    """A plan that does not fit the model it is applied to, or that is not a plan."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)


class LayerRemoval(_Record):
    """Units removed from one decoder layer (indices in the layer as it was)."""

    q_heads: list[int] = []
    kv_heads: list[int] = []
    mlp: list[int] = []
    # mixture of experts (left out of plan.json when empty): removed experts, and per expert (original numbering,
    # one list per expert) the channels removed inside it
    experts: list[int] = Field(default_factory=list, exclude_if=lambda v: not v)
    expert_channels: list[list[int]] = Field(default_factory=list, exclude_if=lambda v: not v)


class LayerShape(_Record):
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_experts: int | None = Field(None, exclude_if=lambda v: v is None)  # MoE layers only
    expert_intermediate_size: int | None = Field(None, exclude_if=lambda v: v is None)


class Merge(_Record):
    """LaCo's RDSC merge: blocks ``from`` folded into block ``into`` (original numbering)."""

    into: int
    from_: list[int] = Field(alias="from")


class DepthTarget(_Record):
    num_blocks: int | None = None
    ratio: float | None = None
    rounding: str = "nearest"


class WidthTarget(_Record):
    ratio: float | None = None
    layer_ratio: float | None = None
    allocation: Allocation = Field(default_factory=UniformAllocation)
    layers: tuple[int, int] | None = None
    attention: str = "kv_group"
    mlp: bool = True
    compensation: Compensation = Field(default_factory=NoCompensation)
    experts: ExpertUnits | None = Field(None, exclude_if=lambda v: v is None)
    expert_channels: ExpertUnits | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="before")
    @classmethod
    def _v1(cls, data: Any) -> Any:  # version 1 wrote `damping` / `optimal_bias` beside `compensation: optimal`
        return fold(data, ("damping", "optimal_bias")) if isinstance(data, dict) else data


class HiddenTarget(_Record):
    ratio: float | None = None
    layer_ratio: float | None = None
    norm_rescale: bool = True


class HiddenRemoval(_Record):
    removed: list[int]
    hidden_before: int
    hidden_after: int
    norm_rescale: bool = True


class _Plan(_Record):
    kind: str
    version: int = Field(PLAN_VERSION, ge=1, le=PLAN_VERSION, description="plan.json format; 1 had no field")
    criterion: str | None = None
    num_removed: int = 0
    layers_before: int | None = None
    layers_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    achieved_ratio: float | None = None
    side_file: str | None = None  # side tensors (compensation) saved beside plan.json

    def to_json(self) -> dict[str, Any]:
        """What ``plan.json`` holds: kind, version, criterion and target first, then the decision and its sizes."""
        data = self.model_dump(mode="json")
        return {**{k: data.pop(k) for k in ("kind", "version", "criterion", "target")}, **data}

    def outputs(self) -> dict[str, Any]:
        """The prune stage's ``done.json`` outputs."""
        return {"removed_blocks": getattr(self, "removed_blocks", None), "num_removed": self.num_removed,
                "achieved_ratio": self.achieved_ratio, "layers_after": self.layers_after, "params_after": self.params_after}

    def metrics(self) -> dict[str, Any]:
        """The ``plan`` section of ``metrics.json``."""
        return {"kind": self.kind, "criterion": self.criterion, "removed_blocks": getattr(self, "removed_blocks", []),
                "removed_units": self.num_removed, "achieved_ratio": self.achieved_ratio or 0.0}

    def _share(self) -> str:
        return f", {self.achieved_ratio:.2%} of all parameters" if self.achieved_ratio is not None else ""

    def describe(self) -> str:
        raise NotImplementedError

    def details(self) -> list[str]:
        """Markdown tables that go with the summary (none by default)."""
        return []


class DepthPlan(_Plan):
    kind: Literal["depth"] = "depth"
    target: DepthTarget = Field(default_factory=DepthTarget)
    merges: list[Merge] = []
    removed_blocks: list[int]

    def describe(self) -> str:
        of = f" of {self.layers_before}" if self.layers_before is not None else ""
        text = (f"Depth pruning by `{self.criterion}`: removed blocks {self.removed_blocks} (0-based, original numbering; "
                f"{len(self.removed_blocks)}{of} blocks{self._share()})")
        if self.merges:
            text += "; LaCo merges (RDSC, in order): " + "; ".join(f"block {m.into} ← {m.from_}" for m in self.merges)
        return text + "."


class WidthPlan(_Plan):
    kind: Literal["width"] = "width"
    target: WidthTarget = Field(default_factory=WidthTarget)
    layers: dict[str, LayerRemoval]
    shapes_before: list[LayerShape] | None = None
    shapes_after: list[LayerShape]
    uniform: bool = True
    layer_ratio_offsets: list[float] | None = None
    layer_alpha: list[float] | None = None

    def describe(self) -> str:
        t = self.target
        units = [u for u, on in (("KV groups" if t.attention == "kv_group" else "query heads", t.attention != "none"),
                                 ("MLP channels", t.mlp), (f"experts by `{t.experts and t.experts.criterion}`", t.experts),
                                 (f"expert channels by `{t.expert_channels and t.expert_channels.criterion}`",
                                  t.expert_channels)) if on]
        span = f" in layers {t.layers[0]}–{t.layers[1] - 1}" if t.layers else ""
        return (f"Width pruning by `{self.criterion}` ({t.allocation.describe()}, {t.compensation.describe()}): "
                f"{self.num_removed} units removed ({' and '.join(units)}){span}{self._share()}; "
                f"{'uniform widths' if self.uniform else 'layer widths differ'}.")

    def details(self) -> list[str]:
        if any(s.num_experts is not None for s in self.shapes_after):
            shared = any(s.intermediate_size for s in self.shapes_after)  # Qwen2-MoE's shared expert: its MLP channels
            lines = [f"| layer | query heads | KV heads |{' MLP channels |' if shared else ''} experts | expert width |",
                     "|---|---|---|---|---|" + ("---|" if shared else "")]
            lines += [f"| {i} | {s.num_attention_heads} | {s.num_key_value_heads} | "
                      f"{f'{s.intermediate_size} | ' if shared else ''}{s.num_experts} | {s.expert_intermediate_size} |"
                      for i, s in enumerate(self.shapes_after)]
        else:
            lines = ["| layer | query heads | KV heads | MLP channels |", "|---|---|---|---|"]
            lines += [f"| {i} | {s.num_attention_heads} | {s.num_key_value_heads} | {s.intermediate_size} |"
                      for i, s in enumerate(self.shapes_after)]
        if self.layer_alpha:
            offs = self.layer_ratio_offsets or [0.0] * len(self.layer_alpha)
            lines += ["", "AlphaPruning α per layer:", "", "| layer | α (Hill) | ratio offset |", "|---|---|---|"]
            lines += [f"| {i} | {a:.3f} | {o:+.4f} |" for i, (a, o) in enumerate(zip(self.layer_alpha, offs))]
        return lines


class HiddenPlan(_Plan):
    kind: Literal["hidden"] = "hidden"
    target: HiddenTarget = Field(default_factory=HiddenTarget)
    hidden: HiddenRemoval
    shapes_before: list[LayerShape] | None = None
    shapes_after: list[LayerShape] | None = None
    uniform: bool = True

    @model_validator(mode="before")
    @classmethod
    def _v1(cls, data: Any) -> Any:
        """Version 1 wrote a hidden-channel plan as ``kind: width`` with a ``hidden`` section, empty ``layers`` and
        ``target.hidden: true``."""
        if not isinstance(data, dict) or data.get("kind") != "width":
            return data
        if data.get("layers"):
            raise ValueError("a version-1 hidden-channel plan must have empty `layers`")
        target = {k: v for k, v in (data.get("target") or {}).items() if k != "hidden"}
        return {**{k: v for k, v in data.items() if k != "layers"}, "kind": "hidden", "target": target}

    def describe(self) -> str:
        h = self.hidden
        return (f"Hidden-channel pruning (LLM-Pruner's channel mode) by `{self.criterion}`: hidden_size {h.hidden_before} → "
                f"{h.hidden_after} in every layer, the embeddings and the head, RMSNorm rescaled: {str(h.norm_rescale).lower()}"
                f"{self._share()}.")


class SublayerTarget(_Record):
    sublayers: str = "attention"
    num_sublayers: int | None = None
    ratio: float | None = None


class SublayerPlan(_Plan):
    """Whole attention / MLP sublayers removed (He et al., arXiv 2406.15786); blocks stay, numbered as before."""

    kind: Literal["sublayers"] = "sublayers"
    target: SublayerTarget = Field(default_factory=SublayerTarget)
    removed_attention: list[int] = []
    removed_mlp: list[int] = []
    shapes_before: list[LayerShape] | None = None
    shapes_after: list[LayerShape]

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "removed_attention": self.removed_attention, "removed_mlp": self.removed_mlp}

    def outputs(self) -> dict[str, Any]:
        return {**super().outputs(), "removed_attention": self.removed_attention, "removed_mlp": self.removed_mlp}

    def describe(self) -> str:
        return (f"Sublayer removal by `{self.criterion}`: attention removed in layers {self.removed_attention}, MLP removed "
                f"in layers {self.removed_mlp} (0-based; {self.num_removed} sublayers{self._share()}); every block stays.")

    def details(self) -> list[str]:
        lines = ["| layer | attention | MLP |", "|---|---|---|"]
        return lines + [f"| {i} | {'removed' if i in self.removed_attention else 'kept'} | "
                         f"{'removed' if i in self.removed_mlp else 'kept'} |" for i in range(len(self.shapes_after))]


def _kind(data: Any) -> str | None:
    if isinstance(data, dict):
        return "hidden" if data.get("kind") == "width" and data.get("hidden") else data.get("kind")
    return getattr(data, "kind", None)


Plan = Annotated[Annotated[DepthPlan, Tag("depth")] | Annotated[WidthPlan, Tag("width")] | Annotated[HiddenPlan, Tag("hidden")]
                 | Annotated[SublayerPlan, Tag("sublayers")], Discriminator(_kind)]
KINDS: dict[str, type[_Plan]] = {"depth": DepthPlan, "width": WidthPlan, "hidden": HiddenPlan, "sublayers": SublayerPlan}
_PLAN: TypeAdapter[DepthPlan | WidthPlan | HiddenPlan | SublayerPlan] = TypeAdapter(Plan)


def load_plan(data: Any) -> DepthPlan | WidthPlan | HiddenPlan:
    """A typed plan from ``plan.json``'s mapping (any version), or the plan itself."""
    if isinstance(data, _Plan):
        return data  # type: ignore[return-value]
    kind = _kind(data)
    if kind not in KINDS:
        raise PlanError(f"unknown plan kind {kind!r}; this version applies: {', '.join(KINDS)}")
    try:
        return _PLAN.validate_python(data)
    except ValidationError as exc:
        raise PlanError(f"not a valid {kind} plan: {exc}") from None


def read_plan(run_dir: Path) -> DepthPlan | WidthPlan | HiddenPlan | None:
    """The plan a run directory's prune stage wrote (a recipe has at most one), or None."""
    found = sorted(Path(run_dir).glob("*/plan.json"))
    return load_plan(json.loads(found[0].read_text())) if found else None


def plan_metrics(plan: _Plan | None) -> dict[str, Any]:
    """``metrics.json``'s plan section (the same keys without a plan)."""
    if plan is None:
        return {"kind": None, "criterion": None, "removed_blocks": [], "removed_units": 0, "achieved_ratio": 0.0}
    return plan.metrics()
