"""Explicit name → entry registries (stages, architectures) and the one mechanism for every variant a recipe chooses
by name (allocations, compensations, losses, calibration sources, export formats, prune units; criteria, one
registry per kind).

Registration is one call that rejects duplicate names, as peft's ``register_peft_method`` does: two modules
silently fighting over a name is a bug we want to see at import time. A variant is registered in the module where
it lives, with its pydantic config class and (optionally) its implementation; the config field that chooses it is
built from the registry by :func:`tagged_union`, so adding a variant is one registration and the union, the error
messages and ``--help`` grow by themselves::

    from prunelab.stages.core.registry import VariantRegistry, register_variant, tagged_union

    class _Allocation(StrictModel):          # the base every allocation's config derives from
        type: str

    ALLOCATIONS = VariantRegistry("allocation", base=_Allocation)

    class OwlAllocation(_Allocation):
        type: Literal["owl"] = "owl"         # the name defaults to the `type` field's default
        m: float = 5.0

    register_variant(ALLOCATIONS, OwlAllocation, "prunelab.stages.selection.owl:owl_ratios")

    class WidthSettings(StrictModel):
        allocation: tagged_union(ALLOCATIONS) = Field(default_factory=...)   # "owl" ≡ {type: owl}

    ALLOCATIONS.impl("owl")   # the implementation, imported on first use (validation stays torch-free)

Torch-free and dependency-free beyond pydantic: the frame and every room may import it.
"""

from __future__ import annotations

import difflib
import importlib
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar, Union, overload

from pydantic import BaseModel, BeforeValidator, Field, SerializeAsAny, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

T = TypeVar("T")
C = TypeVar("C", bound=type[BaseModel])


class Registry(Generic[T]):
    """A mapping from names to entries that refuses to register a name twice."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its entry (a test that registers a variant leaves the registry as it found it)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}"
                           f"{did_you_mean(name, self._entries)}") from None

    def unknown(self, name: object, what: str | None = None) -> str:
        """The one wording of a name that is not registered (``what``: how the caller calls an entry, e.g. "blocks
        criterion"): the choices and the closest one, so every recipe field that names an entry reads the same."""
        return f"unknown {what or self.kind} {name!r}; choose from {', '.join(self._entries)}{did_you_mean(name, self._entries)}"

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


# ----------------------------------------------------------------------------- key checks with messages that help
def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``name``; "" when none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _error(key: str, message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": message}), loc=(key,), input=value)


def allowed_keys(cls: type[BaseModel]) -> list[str]:
    """The keys a mapping may give ``cls`` (aliases where a field has one)."""
    return [f.alias or name for name, f in cls.model_fields.items()]


def validate_as(cls: type[BaseModel], data: Mapping[str, Any], explain: Mapping[str, str]) -> Any:
    """``cls.model_validate(data)``, but a key ``cls`` does not have is reported with ``explain[key]`` (why it does
    not apply here) or as an unknown key with the closest allowed one, together with every other error."""
    allowed = allowed_keys(cls)
    errors = []
    for key, value in data.items():
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            errors.append(_error(key, explain.get(key) or f"unknown key; {hint}allowed keys here: {', '.join(sorted(allowed))}", value))
    if not errors:
        return cls.model_validate(dict(data))
    try:
        cls.model_validate({k: v for k, v in data.items() if k in allowed})
    except ValidationError as exc:  # field errors too; cross-field rules only once the keys are right (as pydantic does)
        errors += [InitErrorDetails(type=PydanticCustomError(e["type"], "{message}", {"message": e["msg"]}), loc=e["loc"],
                                    input=e["input"]) for e in exc.errors() if e["loc"]]
    raise ValidationError.from_exception_data(cls.__name__, errors)


# ----------------------------------------------------------------------------- variants chosen by a tag
def load_target(target: Any) -> Any:
    """An implementation given as ``"module:attribute"`` imported now (how registries stay torch-free until used);
    anything else as it is."""
    if isinstance(target, str) and ":" in target:
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
    return target


@dataclass(frozen=True)
class Variant:
    """A registered variant: its config class (validated with the recipe, torch-free; None only in a registry whose
    variants may have no settings, as most criteria) and its implementation, a callable, any object, or
    ``"module:attribute"`` imported on first :meth:`load` (None: the config is all). A registry may register a
    subclass that carries more facts (``VariantRegistry(entry=...)``: a criterion's needs, paper, ...)."""

    name: str
    config_cls: type[BaseModel] | None
    impl: Any = None

    def load(self) -> Any:
        return load_target(self.impl)


class VariantRegistry(Registry[Variant]):
    """Variants of one setting, keyed by the value of ``key`` in their settings (``type`` unless told).

    ``base``: every config class must derive from it (the field's declared type, so dumps keep each variant's own
    fields); ``default``: the variant a mapping without ``key`` means (None: ``key`` is required); ``shorthand``:
    a bare name is that variant with its defaults (``allocation: global`` ≡ ``allocation: {type: global}``);
    ``entry``: the :class:`Variant` subclass registered (its extra fields are :func:`register_variant`'s keywords);
    ``optional_config``: a variant may have no config class (variants named by a string field rather than a
    mapping, as criteria, most of which have no settings).
    """

    def __init__(self, kind: str, base: type[BaseModel] = BaseModel, key: str = "type", default: str | None = None,
                 shorthand: bool = True, entry: type[Variant] = Variant, optional_config: bool = False) -> None:
        super().__init__(kind)
        self.base, self.key, self.default, self.shorthand = base, key, default, shorthand
        self.entry, self.optional_config = entry, optional_config

    def config(self, name: str) -> type[BaseModel] | None:
        return self.get(name).config_cls

    def impl(self, name: str) -> Any:
        """The implementation registered for ``name`` (imported now if it was given as ``"module:attribute"``)."""
        return self.get(name).load()

    def choices(self) -> str:
        return " | ".join(self.names())

    def validate(self, value: Any, explain: Mapping[str, str] | None = None) -> Any:
        """``value`` (an instance, a bare name, or a mapping with ``key``) as the config of the variant it names;
        an unknown name lists the registered ones, a key the variant lacks gets ``explain[key]`` or the closest key."""
        if isinstance(value, self.base) and any(type(value) is v.config_cls for v in self._entries.values()):
            return value
        if isinstance(value, str) and self.shorthand:
            value = {self.key: value}
        if not isinstance(value, Mapping):
            bare = f"a name ({self.choices()}) or " if self.shorthand else ""
            raise ValueError(f"{self.kind}: give {bare}a mapping with `{self.key}:` and its settings")  # noqa: TRY004
        name = value.get(self.key, self.default)
        if not isinstance(name, str) or name not in self:
            given = f" {name!r}" if name is not None else f": `{self.key}:` is missing"
            raise ValueError(f"{self.kind}{given}: choose {self.choices()}{did_you_mean(name, self.names())}")
        config = self.config(name)
        if config is None:
            raise ValueError(f"{self.kind} {name!r} has no settings; name it without any")
        return validate_as(config, value, explain or {})


@overload
def register_variant(registry: VariantRegistry, config_cls: C, impl: Any = None, *, name: str | None = None,
                     **facts: Any) -> C: ...
@overload
def register_variant(registry: VariantRegistry, config_cls: None, impl: Any = None, *, name: str, **facts: Any) -> None: ...
def register_variant(registry: VariantRegistry, config_cls: C | None, impl: Any = None, *, name: str | None = None,
                     **facts: Any) -> C | None:
    """Register ``config_cls`` (and its implementation) in ``registry`` under ``name``, by default the default of its
    tag field (``type: Literal["owl"] = "owl"`` → ``owl``); a name registered twice is an error. ``facts``: the
    fields of the registry's ``entry`` class beyond a :class:`Variant`'s. Returns the class."""
    if config_cls is None and registry.optional_config:
        if name is None:
            raise ValueError(f"{registry.kind} without settings: give name=...")
    elif not (isinstance(config_cls, type) and issubclass(config_cls, registry.base)):
        raise TypeError(f"{registry.kind} {config_cls!r}: a config class must derive from {registry.base.__name__}")
    if name is None:
        field = config_cls.model_fields.get(registry.key)
        name = field.default if field is not None else None
        if not isinstance(name, str):
            raise ValueError(f"{registry.kind} {config_cls.__name__}: give name=... or a default for its `{registry.key}` field")
    registry.register(name, registry.entry(name, config_cls, impl, **facts))
    return config_cls


def variant(registry: VariantRegistry, impl: Any = None, *, name: str | None = None) -> Callable[[C], C]:
    """Decorator form of :func:`register_variant`."""
    return lambda cls: register_variant(registry, cls, impl, name=name)


def tagged_union(registry: Registry[Any], *, names: Iterable[str] | None = None, frozen: bool = False) -> Any:
    """The type of a field that holds one variant of ``registry``, chosen by its tag.

    By default the union is resolved when a value is validated (a ``BeforeValidator`` over the registry, the field
    typed as the registry's base with each variant's own fields dumped), so a variant registered later — from
    another module or a test — is accepted without touching the model that holds the field. ``frozen=True`` (for a
    union built after every registration, as the recipe's ``stages``): pydantic's own discriminated union over the
    entries' ``config_cls`` (only ``names``, when given), with its tag errors and error paths.
    """
    if frozen:
        key = getattr(registry, "key", "type")
        configs = tuple(registry.get(n).config_cls for n in (names if names is not None else registry.names()))
        if len(configs) == 1:
            return configs[0]
        return Annotated[Union[configs], Field(discriminator=key)]  # type: ignore[valid-type]  # noqa: UP007 (a runtime tuple)
    if not isinstance(registry, VariantRegistry):
        raise TypeError("tagged_union(frozen=False) needs a VariantRegistry (it validates through the registry)")
    return Annotated[SerializeAsAny[registry.base], BeforeValidator(registry.validate)]  # type: ignore[name-defined]


def variant_names(field: Any) -> list[str]:
    """The names a :func:`tagged_union` field (a pydantic ``FieldInfo`` or the annotation) accepts now, for ``--help``
    and docs; a ``Literal``'s values; [] for anything else."""
    for meta in [*getattr(field, "metadata", ()), *getattr(field, "__metadata__", ())]:
        owner = getattr(getattr(meta, "func", None), "__self__", None)
        if isinstance(owner, VariantRegistry):
            return owner.names()
    annotation = getattr(field, "annotation", field)
    return [str(v) for v in typing.get_args(annotation)] if typing.get_origin(annotation) is typing.Literal else []
