"""Criterion settings: each belongs to its criterion (registered with it) and is validated with the recipe, torch-free.

A score stage spells them per criterion: ``settings: {laco: {threshold: 0.4}, taylor: {reduction: mean}}``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from prunelab.stages.core.config import StrictModel
from prunelab.stages.criteria.registry import CRITERIA, settings_fields


class LacoSettings(StrictModel):
    """LaCo's trial-and-merge settings (arXiv 2402.11187, Algorithm 1); defaults from the authors' notebook."""

    merge_layers: int = Field(4, ge=2, description="C: layers collapsed into one per merge (C − 1 removed)")
    layers: tuple[int, int] | None = Field(None, description="[L, H]: lowest and highest layer a merge may touch (default: all)")
    interval: int = Field(1, ge=1, description="I: how far down the next trial starts after a kept merge")
    threshold: float = Field(0.45, ge=-1, lt=1, description="T: keep a merge while the last-hidden-state cosine to the dense model exceeds it")


class WidthGroupSettings(StrictModel):
    """Settings of the width criteria that score each member of a coupled group element-wise and then reduce
    over the members (LLM-Pruner, arXiv 2305.11627: q/k/v rows and o columns of a head group; gate/up rows and
    the down column of an MLP channel; every member of a hidden channel)."""

    reduction: Literal["sum", "mean", "max", "prod"] = Field(
        "sum", description="how the members' importances combine into the group's (LLM-Pruner's aggregation)"
    )
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"grouping": "units"}  # added later: left out of dumps at its default
    grouping: Literal["units", "llm_pruner"] = Field(
        "units", description="units: a KV group's score counts the query heads that share it, each member summed over "
        "the unit, then reduced; llm_pruner: as the official code (torch-pruning fork) does on GQA models — members "
        "reduced per head-dim channel, query rows and output-projection columns folded onto the key projection's channels with stride "
        "n_kv·head_dim (so KV group j counts query heads j, j+n_kv, …, not the ones that share it), then summed over "
        "the head (docs/llm-pruner-parity.md)"
    )



# ----------------------------------------------------------------------------- version 1 spellings
# Version 1 of the score stage carried LaCo's settings (`laco: {...}`) and the width group reduction
# (`reduction: sum`) at its top level; every resolved recipe of version 1 spells both, with their defaults.
_V1_KEYS = ("laco", "reduction")


def migrate_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A score stage's version-1 keys in the per-criterion spelling (``settings:``), or an error giving it.

    - ``laco: {...}`` → ``settings: {laco: {...}}``; dropped when it only restates LaCo's defaults.
    - ``reduction: r`` → ``settings: {c: {reduction: r}}`` for every listed criterion ``c`` that reduces over group
      members (magnitude_l1, taylor, taylor_element2, taylor_vector); dropped when ``r`` is the default ``sum``.
      Where no listed criterion reduces (or none is listed), it is an error naming the new spelling.
    """
    if not any(k in data for k in _V1_KEYS):
        return data
    data = dict(data)
    settings = dict(data.get("settings") or {})
    units = data.get("units", "blocks")
    laco, reduction = data.pop("laco", None), data.pop("reduction", "sum")
    if laco is not None and not _is_default(LacoSettings, laco):
        if units != "blocks":
            raise ValueError("`laco:` holds settings of the depth criterion laco; remove it from this width score stage")
        if "laco" in settings:
            raise ValueError("LaCo's settings are given twice; keep only `settings: {laco: {...}}`")
        settings["laco"] = laco
    if reduction != "sum":
        kind = "depth" if units == "blocks" else "width"
        reducing = [n for n in CRITERIA.of(kind) if "reduction" in settings_fields(CRITERIA.get(kind, n))]
        targets = [c for c in data.get("criteria") or [] if c in reducing]
        if not targets:
            example = "taylor" if "taylor" in reducing or not reducing else reducing[0]
            raise ValueError(f"`reduction: {reduction}` moved into the settings of each criterion that reduces over "
                             f"group members: write `settings: {{{example}: {{reduction: {reduction}}}}}` (criteria "
                             f"that take it: {', '.join(reducing) or 'none of this kind'})")
        for c in targets:
            entry = dict(settings.get(c) or {})
            if entry.setdefault("reduction", reduction) != reduction:
                raise ValueError(f"`reduction: {reduction}` contradicts settings.{c}.reduction; keep only the latter")
            settings[c] = entry
    data["settings"] = settings
    return data


def version_1_keys(kind: str, criteria: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    """The ``laco`` and ``reduction`` entries a version-1 score stage would have dumped for these settings.

    ``reduction`` is the one reduction every listed (or configured) reducing criterion uses; where they differ,
    version 1 could not express it, and the value names no version-1 setting (so no old run matches)."""
    registry = CRITERIA.of(kind)
    names = [n for n in criteria or list(settings) if n in registry and "reduction" in settings_fields(registry.get(n))]
    found = {(settings.get(n) or WidthGroupSettings()).reduction for n in names}
    reduction = found.pop() if len(found) == 1 else ("sum" if not found else "per-criterion")
    return {"laco": (settings.get("laco") or LacoSettings()).model_dump(mode="json"), "reduction": reduction}


def _is_default(model: type[StrictModel], raw: Any) -> bool:
    try:
        return model.model_validate(raw) == model()
    except ValueError:  # invalid: let the settings validation report it where it belongs
        return False
