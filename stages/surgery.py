"""Surgery: the only code that edits weights or architecture. It executes a plan; it never decides.

A plan is plain data (``plan.json``). ``apply_plan`` applied to a fresh copy of the same model gives
the same weights, which is what makes a run resumable and a plan reviewable.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class PlanError(ValueError):
    """A plan that does not fit the model it is applied to."""


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> nn.Module:
    """Apply ``plan`` to ``model`` in place and return it."""
    kind = plan.get("kind")
    if kind == "depth":
        remove_blocks(model, plan["removed_blocks"], expected_layers=plan.get("layers_before"))
        return model
    raise PlanError(f"unknown plan kind {kind!r}; this version applies: depth")


def remove_blocks(model: nn.Module, removed: list[int], expected_layers: int | None = None) -> None:
    """Physically drop decoder blocks; renumber ``layer_idx`` so the KV cache indexes stay dense."""
    layers = model.model.layers
    n = len(layers)
    if expected_layers is not None and n != expected_layers:
        raise PlanError(f"plan was made for a model with {expected_layers} blocks, this one has {n} (already pruned?)")
    bad = [i for i in removed if not 0 <= i < n]
    if bad or len(set(removed)) != len(removed):
        raise PlanError(f"removed_blocks {removed} must be distinct indices in [0, {n})")
    if len(removed) >= n:
        raise PlanError(f"cannot remove all {n} blocks")
    keep = [i for i in range(n) if i not in set(removed)]
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
