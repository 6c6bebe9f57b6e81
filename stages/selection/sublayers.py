"""Sublayer selection: which attention / MLP sublayers a sublayer criterion's result removes, and the plan.

One-shot, as He et al. (arXiv 2406.15786) drop: rank the candidate sublayers by importance (lowest first) and
remove the first k. ``sublayers: both`` ranks attention and MLP scores together (LLM-Drop's ``target_layer: all``).
The same rule serves the removal-cost criteria (``stages.criteria.sublayer_nll``): ``sublayer_ppl`` scores are ΔNLL
(per parameter), ``sublayer_sleb`` scores its greedy removal rank, so its prefix is the greedy's own order.
A ``ratio`` target removes the prefix of that order whose parameter count is nearest the budget (ties: fewer).
"""

from __future__ import annotations

from typing import Any

from prunelab.stages.arch import adapter_for
from prunelab.stages.selection.config import SublayersSettings
from prunelab.stages.selection.targets import ratio_to_params
from prunelab.stages.surgery.plan import LayerShape, SublayerPlan, SublayerTarget


def sublayer_params(adapter: Any) -> dict[tuple[str, int], int]:
    """Parameters each present sublayer takes with it (``ArchAdapter.sublayer_params``)."""
    return adapter.sublayer_params()


def removal_order(result: dict[str, Any], which: str, present: set[tuple[str, int]] | None = None) -> list[tuple[str, int]]:
    """Candidate sublayers, least important first (ties: attention before MLP, then the lower layer); only those in
    ``present`` (a model already pruned has no-ops, whose cosine is 1, where sublayers were)."""
    kinds = ("attention", "mlp") if which == "both" else (which,)
    missing = [k for k in kinds if k not in result]
    if missing:
        raise ValueError(f"this criterion's result has no {' / '.join(missing)} sublayer scores; use sublayer_cosine, sublayer_ppl or sublayer_sleb")
    cands = [(s, k, i) for k in kinds for i, s in enumerate(result[k]) if present is None or (k, i) in present]
    return [(k, i) for s, k, i in sorted(cands, key=lambda c: (c[0], c[1] != "attention", c[2]))]


def select_sublayers(order: list[tuple[str, int]], params: dict[tuple[str, int], int],
                     count: int | None = None, budget: int | None = None) -> list[tuple[str, int]]:
    """The first ``count`` removable sublayers of ``order`` (or the prefix nearest ``budget`` parameters); the last
    sublayer of a kind is never removed (a model needs one attention and one MLP)."""
    left = {k: sum(1 for kk, _ in params if kk == k) for k in ("attention", "mlp")}  # sublayers still present
    removable = []
    for k, i in order:
        if left[k] > 1:
            removable.append((k, i))
            left[k] -= 1
    if count is not None:
        if count > len(removable):
            raise ValueError(f"{count} sublayers requested, only {len(removable)} may be removed")
        return removable[:count]
    assert budget is not None
    best, total = 0, 0
    best_gap = budget
    for n, unit in enumerate(removable, start=1):
        total += params[unit]
        if abs(total - budget) < best_gap:
            best, best_gap = n, abs(total - budget)
    if best == 0:
        raise ValueError(f"a parameter budget of {budget} is nearer to removing no sublayer than one; raise the ratio")
    return removable[:best]


def make_sublayer_plan(result: dict[str, Any], cfg: SublayersSettings, adapter: Any) -> SublayerPlan:
    """The sublayer plan for ``cfg``'s target from one criterion's saved result."""
    from prunelab.stages.surgery.sublayers import sublayer_refusal  # lazy: torch-free

    refusal = sublayer_refusal(adapter.model)
    if refusal:
        raise ValueError(refusal)
    n = adapter.num_blocks
    problems = cfg.check_model(n)
    if problems:
        raise ValueError("; ".join(problems))
    params = sublayer_params(adapter)  # present sublayers only
    before = adapter.total_params()
    budget = ratio_to_params(cfg.ratio, before) if cfg.ratio is not None else None
    chosen = select_sublayers(removal_order(result, cfg.sublayers, set(params)), params, cfg.num_sublayers, budget)
    attention = sorted(i for k, i in chosen if k == "attention")
    mlp = sorted(i for k, i in chosen if k == "mlp")
    shapes = [LayerShape(num_attention_heads=g.n_q, num_key_value_heads=g.n_kv, intermediate_size=g.intermediate)
              for g in adapter.geometries()]
    after_shapes = [LayerShape(num_attention_heads=0 if i in attention else s.num_attention_heads,
                               num_key_value_heads=0 if i in attention else s.num_key_value_heads,
                               intermediate_size=0 if i in mlp else s.intermediate_size) for i, s in enumerate(shapes)]
    after = before - sum(params[u] for u in chosen)
    return SublayerPlan(
        criterion=cfg.criterion,
        target=SublayerTarget(sublayers=cfg.sublayers, num_sublayers=cfg.num_sublayers, ratio=cfg.ratio),
        removed_attention=attention, removed_mlp=mlp, num_removed=len(chosen),
        layers_before=n, layers_after=n, params_before=before, params_after=after,
        achieved_ratio=round(1 - after / before, 6), shapes_before=shapes, shapes_after=after_shapes,
    )


def sublayers_plan(result: dict[str, Any], cfg: SublayersSettings, model: Any, stats: Any = None, results: Any = None,
                   calibration: Any = None) -> tuple[SublayerPlan, dict[str, Any]]:
    """The plan maker registered for ``units: sublayers`` (``selection.config.SELECTIONS``): no side tensors."""
    return make_sublayer_plan(result, cfg, adapter_for(model)), {}
