"""The base of every settings class (recipe sections, criterion settings, bench rows), and the path types they share."""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, SerializationInfo, ValidationError, model_serializer,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

HASH_KEY = "hash"
HASH_CONTEXT = {HASH_KEY: True}  # ``model_dump(mode="json", context=HASH_CONTEXT)``: the settings ``--resume`` hashes
BOOL_NOT_NUMBER = "true/false is a yes/no value, not a number; give a number here (e.g. 2)"


class _InputFileMarker:
    """Marks a settings field naming a local file a stage reads: ``--resume`` fingerprints its content."""

    def __repr__(self) -> str:
        return "INPUT_FILE"


INPUT_FILE = _InputFileMarker()


def expand_user(value: str) -> str:
    """``~`` and ``~user`` expanded, once, at validation: every reader of the settings sees the same path."""
    return os.path.expanduser(value)


PathStr = Annotated[str, AfterValidator(expand_user)]  # a string that may be a local path (~ expanded)
InputFile = Annotated[str, AfterValidator(expand_user), INPUT_FILE]  # a local file a stage reads (~ expanded)


class StrictModel(BaseModel):
    """Unknown keys are errors, not silently ignored; defaults are validated like given values; a bool is not a
    number (pydantic would read ``num_blocks: true`` as 1).

    ``LATER_FIELDS`` names fields added after run directories already existed, each with the value at which it
    is left out of dumps: a recipe that does not use the field dumps (and hashes, for ``--resume``) as before.

    ``NOT_HASHED`` names fields that do not change any stage's result (where the weights sit while a model is
    evaluated, say): left out of the dump made for ``--resume``'s hash (``HASH_CONTEXT``), at any depth, so changing
    one restores the finished stages instead of re-running the run.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)
    LATER_FIELDS: ClassVar[dict[str, Any]] = {}
    NOT_HASHED: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data: Any) -> Any:
        """A model-level check (a field validator on ``*`` would also reach the ``type`` discriminators, which pydantic
        forbids); the errors still carry each field's own location."""
        if not isinstance(data, dict):
            return data
        errors = [InitErrorDetails(type=PydanticCustomError("bool_not_number", BOOL_NOT_NUMBER), loc=(name,), input=value)
                  for name, value in data.items()
                  if name in cls.model_fields and _bool_as_number(cls.model_fields[name].annotation, value)]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any, info: SerializationInfo) -> Any:
        out = handler(self)
        if isinstance(out, dict):
            for name, omitted in self.LATER_FIELDS.items():
                if getattr(self, name) == omitted:
                    out.pop(name, None)
            if isinstance(info.context, dict) and info.context.get(HASH_KEY):
                for name in self.NOT_HASHED:
                    out.pop(name, None)
        return out


def _members(ann: Any) -> list[Any]:
    """The alternatives of an annotation (``Annotated`` stripped, unions flattened)."""
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (Union, types.UnionType):
        return [m for a in typing.get_args(ann) for m in _members(a)]
    return [ann]


def _bool_as_number(ann: Any, value: Any) -> bool:
    """Whether ``value`` holds a bool where ``ann`` wants a number and no alternative takes a bool (in a list's
    items or a mapping's values too)."""
    members = _members(ann)
    if isinstance(value, bool):
        if any(m in (bool, Any, object) or (typing.get_origin(m) is typing.Literal and value in typing.get_args(m)
                                            and any(isinstance(a, bool) for a in typing.get_args(m))) for m in members):
            return False
        return any(m in (int, float) for m in members)
    if isinstance(value, (list, tuple)):
        items = [typing.get_args(m)[0] for m in members if typing.get_origin(m) in (list, tuple, set) and typing.get_args(m)]
        return any(_bool_as_number(item, v) for item in items for v in value)
    if isinstance(value, dict):
        vals = [typing.get_args(m)[1] for m in members if typing.get_origin(m) is dict and len(typing.get_args(m)) == 2]
        return any(_bool_as_number(v_ann, v) for v_ann in vals for v in value.values())
    return False


def _names_input_file(ann: Any) -> bool:
    """Whether an annotation carries the INPUT_FILE marker anywhere (through Optional, unions, lists)."""
    if typing.get_origin(ann) is Annotated:
        if any(m is INPUT_FILE for m in ann.__metadata__):
            return True
        return _names_input_file(typing.get_args(ann)[0])
    return any(_names_input_file(a) for a in typing.get_args(ann))


def settings_objects(node: Any, path: str) -> Iterator[tuple[str, BaseModel]]:
    """(dotted path, settings object) for every pydantic settings object under ``node``, lists and mappings
    included: the one walk over a recipe's settings (preflight's checks, the input files ``--resume`` keys on)."""
    if isinstance(node, BaseModel):
        yield path, node
        for name in type(node).model_fields:
            yield from settings_objects(getattr(node, name), f"{path}.{name}")
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from settings_objects(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from settings_objects(value, f"{path}.{i}")


def input_files(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """(dotted field, path) for every local input file named in a settings object, nested settings, lists and
    mappings included: what ``--resume`` fingerprints."""
    for path, obj in settings_objects(node, where):
        for name, field in type(obj).model_fields.items():
            if not _names_input_file(field.annotation):
                continue
            value = getattr(obj, name)
            files = value if isinstance(value, (list, tuple)) else [value]
            for i, file in enumerate(files):
                if isinstance(file, str):
                    yield (f"{path}.{name}" + (f".{i}" if isinstance(value, (list, tuple)) else "")), file
        resolved = getattr(obj, "resolved_input_file", None)  # a named dataset read from a local file it finds itself
        if callable(resolved) and (found := resolved()) is not None:
            yield f"{path}.resolved", found
