"""The base of every settings class (recipe sections, criterion settings, bench rows)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_serializer


class StrictModel(BaseModel):
    """Unknown keys are errors, not silently ignored; defaults are validated like given values.

    ``LATER_FIELDS`` names fields added after run directories already existed, each with the value at which it
    is left out of dumps: a recipe that does not use the field dumps (and hashes, for ``--resume``) as before.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)
    LATER_FIELDS: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict):
            for name, omitted in self.LATER_FIELDS.items():
                if getattr(self, name) == omitted:
                    out.pop(name, None)
        return out
