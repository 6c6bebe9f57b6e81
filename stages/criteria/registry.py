"""The criterion registry: depth and width criteria are variants of the one registry mechanism
(``prunelab.stages.core.registry``), like allocations, compensations and losses.

Name spaces are per kind. A recipe always names a criterion in the context of the units it scores (the
``units:`` of a score or prune stage: blocks → depth; width and hidden channels → width), and the same word can
mean different mathematics per kind: ``magnitude`` is the L1 norm of a whole block in depth and the L2 norm of a
coupled group in width; ``random`` draws one number per block or one per head and channel. So each kind is one
:class:`~prunelab.stages.core.registry.VariantRegistry` whose entries are :class:`CriterionSpec` (a ``Variant``: the
settings model is its config, the score function its implementation), registered with ``register_variant``: the
same duplicate refusal, "did you mean" wording and lazy ``"module:function"`` loading as every other variant, one
settings validation and one scoring path (``prunelab.stages.criteria.scoring``), while both kinds keep the papers'
names. :data:`CRITERIA` holds the two.

Score functions resolve lazily (``"module:function"``), and settings classes are pydantic models without torch,
so validating a recipe never imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails

from prunelab.stages.core.registry import Variant, VariantRegistry, did_you_mean, load_target, register_variant

if TYPE_CHECKING:
    from prunelab.stages.criteria.base import CriterionInputs, CriterionResult

Kind = Literal["depth", "width"]
# What a width criterion's result scores per layer (stages.criteria.base.CriterionResult.layers keys).
WIDTH_UNITS: tuple[str, ...] = ("q_heads", "kv_groups", "mlp")
KINDS: tuple[Kind, ...] = ("depth", "width")
# sublayers (attention / MLP as a whole) are scored per block by depth criteria (``sublayer_cosine``)
_UNITS_KIND: dict[str, Kind] = {"blocks": "depth", "depth": "depth", "width": "width", "hidden": "width",
                                "sublayers": "depth"}


def kind_of(units: str) -> Kind:
    """The criterion kind that scores a stage's ``units`` (blocks → depth; width, hidden → width)."""
    try:
        return _UNITS_KIND[units]
    except KeyError:
        raise ValueError(f"units {units!r}: choose one of {', '.join(_UNITS_KIND)}") from None


@dataclass(frozen=True)
class CriterionSpec(Variant):
    """A registered criterion: a variant whose config is its pydantic settings model (``settings``; None: it has
    none) and whose implementation is its score function (``score_fn``: ``(CriterionInputs) -> CriterionResult``, a
    callable or ``"module:function"`` resolved on first use).

    ``needs``: the statistics the calibration pass must collect for it (``prunelab.stages.calibration.needs.NEEDS``);
    ``hidden``: width only, the hidden-channel form ``(CriterionInputs) -> list[float]``; ``iterative``: depth
    criteria that re-score as they remove and need the later prune stage's target; ``paper``: the citation saved
    with every result; ``units``: width only, what it scores (q_heads, kv_groups, mlp, experts, expert_channels).
    """

    kind: Kind = "depth"
    needs: frozenset[str] = field(default_factory=frozenset)
    hidden: str | Callable[..., Any] | None = None
    iterative: bool = False
    paper: str = ""
    units: tuple[str, ...] = WIDTH_UNITS

    @property
    def score_fn(self) -> str | Callable[..., Any]:
        return self.impl

    @property
    def settings(self) -> type[BaseModel] | None:
        return self.config_cls

    def load(self) -> Callable[[CriterionInputs], CriterionResult]:
        return load_target(self.impl)

    def load_hidden(self) -> Callable[[CriterionInputs], list[float]]:
        if self.hidden is None:
            raise ValueError(f"criterion {self.name!r} does not score hidden channels; choose one of "
                             f"{', '.join(hidden_criteria())}")
        return load_target(self.hidden)


class CriterionRegistry:
    """The two kinds' variant registries (``of(kind)``: name → :class:`CriterionSpec`); ``get(kind, name)`` looks one
    up, iterating gives every spec, depth first."""

    def __init__(self) -> None:
        self._kinds: dict[str, VariantRegistry] = {
            k: VariantRegistry(f"{k} criterion", entry=CriterionSpec, optional_config=True) for k in KINDS}

    def register(self, spec: CriterionSpec) -> CriterionSpec:
        """Register a spec built elsewhere (as :func:`register_criterion` does from its arguments)."""
        return register_criterion(spec.name, spec.score_fn, spec.kind, spec.needs, spec.settings, spec.hidden,
                                  spec.iterative, spec.paper, spec.units, registry=self)

    def of(self, kind: str) -> VariantRegistry:
        try:
            return self._kinds[kind]
        except KeyError:
            raise ValueError(f"criterion kind {kind!r}: choose one of {', '.join(KINDS)}") from None

    def get(self, kind: str, name: str) -> CriterionSpec:
        return self.of(kind).get(name)

    def __iter__(self) -> Iterator[CriterionSpec]:
        return (reg.get(n) for reg in self._kinds.values() for n in reg)


CRITERIA = CriterionRegistry()


def register_criterion(
    name: str,
    score_fn: str | Callable[..., Any],
    kind: Kind = "depth",
    needs: set[str] | frozenset[str] = frozenset(),
    settings: type[BaseModel] | None = None,
    hidden: str | Callable[..., Any] | None = None,
    iterative: bool = False,
    paper: str = "",
    units: tuple[str, ...] = WIDTH_UNITS,
    *,
    registry: CriterionRegistry | None = None,
) -> CriterionSpec:
    """Register a criterion of ``kind`` (in :data:`CRITERIA` unless ``registry``) through ``register_variant``: a
    name registered twice within a kind is an error; the same name in the other kind is another criterion."""
    registry = CRITERIA if registry is None else registry
    if hidden is not None and kind != "width":
        raise ValueError(f"criterion {name!r}: only width criteria have a hidden-channel form")
    register_variant(registry.of(kind), settings, score_fn, name=name, kind=kind, needs=frozenset(needs),
                     hidden=hidden, iterative=iterative, paper=paper, units=tuple(units))
    return registry.get(kind, name)


def criteria_for(units: str) -> VariantRegistry:
    """The criteria that can score a stage's ``units`` ("blocks", "width", "hidden", or a kind)."""
    return CRITERIA.of(kind_of(units))


def hidden_criteria() -> list[str]:
    """Width criteria that also define a hidden-channel importance (LLM-Pruner's channel mode)."""
    return [s.name for s in CRITERIA if s.hidden is not None]


def settings_fields(spec: CriterionSpec) -> set[str]:
    return set(spec.settings.model_fields) if spec.settings is not None else set()


def validate_settings(kind: str, raw: dict[str, Any]) -> dict[str, BaseModel]:
    """Each entry of a score stage's ``settings:`` validated against its criterion's settings model.

    Raises a ``ValidationError`` whose locations name the criterion and the field (``laco.threshold``), so the
    recipe reports ``stages.score.settings.laco.threshold: ...`` with the keys allowed there."""
    registry, out, errors = CRITERIA.of(kind), {}, []
    with_settings = [n for n in registry if registry.get(n).settings is not None]
    for name, value in raw.items():
        if name not in registry:
            errors.append(_error((name,), value, f"unknown {kind} criterion {name!r}; criteria with settings: "
                                 f"{', '.join(with_settings)}{did_you_mean(name, registry)}"))
            continue
        spec = registry.get(name)
        if spec.settings is None:
            errors.append(_error((name,), value, f"{kind} criterion {name!r} has no settings; remove this entry "
                                 f"(criteria with settings: {', '.join(with_settings)})"))
            continue
        try:
            out[name] = spec.settings.model_validate(value if value is not None else {})
        except ValidationError as exc:
            errors += [_explained(spec, name, e) for e in exc.errors()]
    if errors:
        raise ValidationError.from_exception_data("criterion settings", errors)
    return out


def _explained(spec: CriterionSpec, name: str, err: Any) -> InitErrorDetails:
    loc = (name, *err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = sorted(settings_fields(spec))
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return _error(loc, err["input"], f"unknown key; {hint}allowed keys here: {', '.join(allowed)}")
    return _error(loc, err["input"], f"{err['msg']} (got {err['input']!r})")


def _error(loc: tuple[Any, ...], value: Any, msg: str) -> InitErrorDetails:
    return {"type": "value_error", "loc": loc, "input": value, "ctx": {"error": ValueError(msg)}}
