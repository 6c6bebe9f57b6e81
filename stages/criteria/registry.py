"""The criterion registry: one spec class and one registration call for depth and width criteria.

Name spaces are per kind. A recipe always names a criterion in the context of the units it scores (the
``units:`` of a score or prune stage: blocks → depth; width and hidden channels → width), and the same word can
mean different mathematics per kind: ``magnitude`` is the L1 norm of a whole block in depth and the L2 norm of a
coupled group in width; ``random`` draws one number per block or one per head and channel. So ONE registry object
holds every spec, keyed by (kind, name): one spec class, one registration (duplicates rejected within a kind), one
settings validation and one scoring path (``prunelab.stages.criteria.scoring``), while both kinds keep the papers' names.

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

from prunelab.stages.core.registry import Registry, load_target

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
class CriterionSpec:
    """A registered criterion.

    ``score_fn``: ``(CriterionInputs) -> CriterionResult``, a callable or ``"module:function"`` (resolved on first use);
    ``needs``: the statistics the calibration pass must collect for it (``prunelab.stages.calibration.stats.NEEDS``);
    ``settings``: its pydantic settings model (None: it has none); ``hidden``: width only, the hidden-channel form
    ``(CriterionInputs) -> list[float]``; ``iterative``: depth criteria that re-score as they remove and need the
    later prune stage's target; ``paper``: the citation saved with every result.
    """

    name: str
    kind: Kind
    score_fn: str | Callable[..., Any]
    needs: frozenset[str] = field(default_factory=frozenset)
    settings: type[BaseModel] | None = None
    hidden: str | Callable[..., Any] | None = None
    iterative: bool = False
    paper: str = ""
    units: tuple[str, ...] = WIDTH_UNITS

    def load(self) -> Callable[[CriterionInputs], CriterionResult]:
        return load_target(self.score_fn)

    def load_hidden(self) -> Callable[[CriterionInputs], list[float]]:
        if self.hidden is None:
            raise ValueError(f"criterion {self.name!r} does not score hidden channels; choose one of "
                             f"{', '.join(hidden_criteria())}")
        return load_target(self.hidden)


class CriterionRegistry:
    """Every criterion, keyed by (kind, name); ``of(kind)`` is one kind's name → spec registry."""

    def __init__(self) -> None:
        self._kinds: dict[str, Registry[CriterionSpec]] = {k: Registry(f"{k} criterion") for k in KINDS}

    def register(self, spec: CriterionSpec) -> CriterionSpec:
        if spec.kind not in self._kinds:
            raise ValueError(f"criterion {spec.name!r}: kind {spec.kind!r}; choose one of {', '.join(KINDS)}")
        if spec.hidden is not None and spec.kind != "width":
            raise ValueError(f"criterion {spec.name!r}: only width criteria have a hidden-channel form")
        return self._kinds[spec.kind].register(spec.name, spec)

    def of(self, kind: str) -> Registry[CriterionSpec]:
        return self._kinds[kind]

    def get(self, kind: str, name: str) -> CriterionSpec:
        return self._kinds[kind].get(name)

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
) -> CriterionSpec:
    return CRITERIA.register(CriterionSpec(name, kind, score_fn, frozenset(needs), settings, hidden, iterative, paper, units))


def criteria_for(units: str) -> Registry[CriterionSpec]:
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
                                 f"{', '.join(with_settings)}"))
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
