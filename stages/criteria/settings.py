"""Criterion settings (torch-free, validated with the recipe)."""

from __future__ import annotations

from pydantic import Field

from stages.core.config import StrictModel


class LacoSettings(StrictModel):
    """LaCo's trial-and-merge settings (arXiv 2402.11187, Algorithm 1); defaults from the authors' notebook."""

    merge_layers: int = Field(4, ge=2, description="C: layers collapsed into one per merge (C − 1 removed)")
    layers: tuple[int, int] | None = Field(None, description="[L, H]: lowest and highest layer a merge may touch (default: all)")
    interval: int = Field(1, ge=1, description="I: how far down the next trial starts after a kept merge")
    threshold: float = Field(0.45, ge=-1, lt=1, description="T: keep a merge while the last-hidden-state cosine to the dense model exceeds it")
