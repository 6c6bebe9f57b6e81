"""Stage: select units from scores → ``plan.json`` → surgery. The plan is the contract between them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.recipe import StrictModel
from pipeline.registry import CRITERIA, register_stage
from stages import criteria as _criteria  # noqa: F401


class PruneConfig(StrictModel):
    type: Literal["prune"]
    criterion: str = Field(..., description="which computed criterion decides (see `score`)")
    num_blocks: int | None = Field(None, ge=1, description="remove exactly this many blocks")
    ratio: float | None = Field(
        None, gt=0, lt=1, description="remove this fraction of ALL parameters (embeddings included, as Shortened LLaMA counts)"
    )
    rounding: Literal["nearest", "floor", "ceil"] = Field(
        "nearest", description="how a ratio becomes a whole number of blocks"
    )

    @field_validator("criterion")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in CRITERIA:
            raise ValueError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA.names())}")
        return name

    @model_validator(mode="after")
    def _one_target(self) -> "PruneConfig":
        if (self.num_blocks is None) == (self.ratio is None):
            raise ValueError("give exactly one target: `num_blocks` (a count) or `ratio` (a fraction of parameters in (0, 1))")
        return self

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        if any(stages[k].type == "prune" for k in seen):
            return ["only one prune stage per recipe; combine targets into one"]
        scorers = [stages[k] for k in seen if stages[k].type == "score"]
        if not scorers:
            return ["needs a `score` stage before it"]
        if not any(not s.criteria or self.criterion in s.criteria for s in scorers):
            return [f"criterion {self.criterion!r} is not computed by an earlier score stage; add it to its `criteria`"]
        return []

    def check_model(self, num_layers: int, total_params: int | None = None, block_params: float | None = None) -> list[str]:
        """Problems only visible once the model's size is known (checked before any heavy work)."""
        if self.num_blocks is not None and self.num_blocks >= num_layers:
            return [f"num_blocks={self.num_blocks} but the model has {num_layers} blocks; choose at most {num_layers - 1}"]
        if self.ratio is not None and total_params and block_params:
            k = _round(self.ratio * total_params / block_params, self.rounding)
            if k >= num_layers:
                return [f"ratio={self.ratio} would remove {k} of {num_layers} blocks; choose a smaller ratio"]
            if k < 1:
                return [f"ratio={self.ratio} is less than one block ({block_params / total_params:.3f}); raise it or use num_blocks"]
        return []


def _round(x: float, rule: str) -> int:
    if rule == "floor":
        return math.floor(x + 1e-9)
    if rule == "ceil":
        return math.ceil(x - 1e-9)
    return math.floor(x + 0.5)


def num_blocks_for(cfg: PruneConfig, adapter: Any) -> int:
    """Resolve the target to a block count (blocks of one decoder are equal in size)."""
    sizes = adapter.block_param_counts()
    problems = cfg.check_model(len(sizes), adapter.total_params(), sum(sizes) / len(sizes))
    if problems:
        raise ValueError("; ".join(problems))
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    return _round(cfg.ratio * adapter.total_params() / (sum(sizes) / len(sizes)), cfg.rounding)


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


def make_plan(result: dict[str, Any], cfg: PruneConfig, adapter: Any) -> dict[str, Any]:
    """The depth plan for ``cfg``'s target from one criterion's saved result (plain data in, plain data out)."""
    k = num_blocks_for(cfg, adapter)
    removed = select_blocks(result, k)
    sizes = adapter.block_param_counts()
    before = adapter.total_params()
    after = before - sum(sizes[i] for i in removed)
    return {
        "kind": "depth",
        "criterion": cfg.criterion,
        "target": {"num_blocks": cfg.num_blocks, "ratio": cfg.ratio, "rounding": cfg.rounding},
        "removed_blocks": removed,
        "num_removed": len(removed),
        "layers_before": len(sizes),
        "layers_after": len(sizes) - len(removed),
        "params_before": before,
        "params_after": after,
        "achieved_ratio": round(1 - after / before, 6),
    }


def _apply(ctx: Any, plan: dict[str, Any]) -> dict[str, Any]:
    from stages.surgery import apply_plan

    apply_plan(ctx.model, plan)
    ctx.plan, ctx.state = plan, "pruned"
    ctx.model_info.update(params_after=ctx.adapter.total_params(), layers_after=ctx.adapter.num_blocks)
    return {k: plan[k] for k in ("removed_blocks", "achieved_ratio", "layers_after", "params_after")}


def run(ctx: Any, cfg: PruneConfig) -> dict[str, Any]:
    from pipeline.rundir import atomic_write_json

    plan = make_plan(ctx.scores[cfg.criterion], cfg, ctx.adapter)
    if ctx.is_main:
        atomic_write_json(ctx.stage_dir / "plan.json", plan)
    return _apply(ctx, plan)


def restore(ctx: Any, cfg: PruneConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    _apply(ctx, json.loads((stage_dir / "plan.json").read_text()))


register_stage("prune", PruneConfig, run, restore)
