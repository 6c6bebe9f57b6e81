"""Depth selection: which blocks a criterion's saved result removes, and the depth plan."""

from __future__ import annotations

from typing import Any

from prunelab.stages.arch import adapter_for
from prunelab.stages.selection.config import BlocksSettings
from prunelab.stages.selection.targets import blocks_for_ratio
from prunelab.stages.surgery.plan import DepthPlan, DepthTarget, Merge


def num_blocks_for(cfg: BlocksSettings, adapter: Any) -> int:
    """Resolve the target to a block count (blocks of one decoder are equal in size)."""
    sizes = adapter.block_param_counts()
    problems = cfg.check_model(len(sizes), adapter.total_params(), sum(sizes) / len(sizes))
    if problems:
        raise ValueError("; ".join(problems))
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    return blocks_for_ratio(cfg.ratio, adapter.total_params(), sum(sizes) / len(sizes), cfg.rounding)


def select_blocks(result: dict[str, Any], k: int) -> list[int]:
    """Blocks to remove: the best window (angular), the first k of an order (SLEB), else the k lowest scores."""
    if "windows" in result:
        dist = result["windows"][str(k)]
        start = min(range(len(dist)), key=lambda s: (dist[s], s))
        return list(range(start, start + k))
    if "order" in result:
        if len(result["order"]) < k:
            raise ValueError(f"criterion ordered only {len(result['order'])} blocks, {k} requested; re-run score")
        return sorted(result["order"][:k])
    candidates = [(s, i) for i, s in enumerate(result["scores"]) if s is not None and i not in set(result.get("protected", []))]
    if len(candidates) < k:
        raise ValueError(f"only {len(candidates)} blocks may be removed under this criterion's protections, {k} requested")
    return sorted(i for _, i in sorted(candidates)[:k])


def make_plan(result: dict[str, Any], cfg: BlocksSettings, adapter: Any) -> DepthPlan:
    """The depth plan for ``cfg``'s target from one criterion's saved result."""
    k = num_blocks_for(cfg, adapter)
    removed = select_blocks(result, k)
    sizes = adapter.block_param_counts()
    before = adapter.total_params()
    after = before - sum(sizes[i] for i in removed)
    merges = result.get("merges") or []
    if merges and sorted(j for mg in merges for j in mg["from"]) != removed:
        raise ValueError(f"criterion {cfg.criterion} merged {[mg['from'] for mg in merges]} but {k} blocks are to be removed; re-run score")
    return DepthPlan(
        criterion=cfg.criterion,
        target=DepthTarget(num_blocks=cfg.num_blocks, ratio=cfg.ratio, rounding=cfg.rounding),
        merges=[Merge(into=mg["into"], from_=mg["from"]) for mg in merges],
        removed_blocks=removed,
        num_removed=len(removed),
        layers_before=len(sizes),
        layers_after=len(sizes) - len(removed),
        params_before=before,
        params_after=after,
        achieved_ratio=round(1 - after / before, 6),
    )


def blocks_plan(result: dict[str, Any], cfg: BlocksSettings, model: Any, stats: Any = None, results: Any = None,
                calibration: Any = None) -> tuple[DepthPlan, dict[str, Any]]:
    """The plan maker registered for ``units: blocks`` (``selection.config.SELECTIONS``): no side tensors."""
    return make_plan(result, cfg, adapter_for(model)), {}
