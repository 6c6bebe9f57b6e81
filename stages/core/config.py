"""The base of every settings class (recipe sections, criterion settings, bench rows)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors, not silently ignored; defaults are validated like given values."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
