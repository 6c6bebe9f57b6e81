"""Width selection: per-unit scores + a target → which heads / KV groups / MLP channels go.

Two allocations:
- ``uniform``: every layer in range loses the same fraction of its units (the result keeps a
  vanilla config);
- ``global``: KV groups and MLP channels of all layers in range are ranked on one scale and removed
  cheapest-first, each weighted by its parameter cost (FLAP's adaptive structure, "AL-AM"); layer
  widths then differ and the model needs the prunelab loader.
``select_uniform`` also takes per-layer ratio offsets from OWL (``prunelab.stages.selection.owl``) or AlphaPruning
(``prunelab.stages.selection.alpha``). Compensation of what is removed lives in ``prunelab.stages.surgery.compensation``.
``round_to`` N keeps every pruned layer's MLP width a multiple of N (Torch-Pruning's ``round_to``; Minitron's 64);
what the serving engines run is applied on top by ``prunelab.stages.selection.engines``.
"""

from __future__ import annotations

import math
from typing import Any

from prunelab.stages.calibration.width import LayerGeometry
from prunelab.stages.selection.targets import lowest, round_count


class WidthTargetError(ValueError):
    """A target that cannot be met without breaking a layer (no heads left, KV groups split, ...)."""


def _llm_pruner_count(r: float, units: int, width: int = 1) -> int:
    """The official LLM-Pruner count (torch-pruning fork, ``MetaPruner.prune_local``): of ``units · width``
    channels it prunes ``n − int(n · (1 − r))``, then whole units of ``width`` consecutive channels (``//``)."""
    n = units * width
    return (n - int(n * (1 - r))) // width


def check_round_to(round_to: int, geos: list[LayerGeometry], layers: list[int]) -> None:
    """``round_to`` must fit every pruned layer's MLP width (a kept width is a positive multiple of it)."""
    for i in layers:
        if round_to > geos[i].intermediate:
            raise WidthTargetError(f"round_to={round_to} exceeds layer {i}'s MLP width ({geos[i].intermediate} channels); "
                                   f"choose at most {geos[i].intermediate}")


def rounded_removal(width: int, k: int, round_to: int) -> int:
    """MLP channels to remove so the kept width ``width − k`` becomes the nearest positive multiple of ``round_to``
    (half up); a layer that loses nothing stays whole, and a kept width rounding to ``width`` or more keeps all."""
    if round_to == 1 or k == 0:
        return k
    keep = max(math.floor((width - k) / round_to + 0.5), 1) * round_to
    return max(width - keep, 0)


def uniform_layer(scores: dict[str, list[float]], geo: LayerGeometry, r: float, attention: str, mlp: bool, index: int,
                  counts: str = "nearest", round_to: int = 1) -> dict[str, list[int]]:
    """Remove fraction ``r`` of one layer's units (rounded to whole units: ``counts`` nearest, or llm_pruner's rule;
    the kept MLP width then to a multiple of ``round_to``)."""
    out: dict[str, list[int]] = {"q_heads": [], "kv_heads": [], "mlp": []}

    def count(units: int, width: int = 1) -> int:
        return _llm_pruner_count(r, units, width) if counts == "llm_pruner" else round_count(r * units)

    if mlp:
        k = rounded_removal(geo.intermediate, count(geo.intermediate), round_to)
        if k >= geo.intermediate:
            raise WidthTargetError(f"layer {index}: ratio {r:.3f} would remove all {geo.intermediate} MLP channels")
        out["mlp"] = lowest(scores["mlp"], k)
    if attention == "kv_group":
        k = count(geo.n_kv, geo.head_dim)
        if k >= geo.n_kv:
            raise WidthTargetError(f"layer {index}: ratio {r:.3f} would remove every head (all {geo.n_kv} KV groups); lower it")
        out["kv_heads"] = lowest(scores["kv_groups"], k)
        qg = geo.q_per_group
        out["q_heads"] = [g * qg + j for g in out["kv_heads"] for j in range(qg)]
    elif attention == "q_head":
        per_group = count(geo.q_per_group, geo.head_dim)
        if per_group >= geo.q_per_group:
            raise WidthTargetError(f"layer {index}: ratio {r:.3f} would remove every query head of each group; lower it")
        qg = geo.q_per_group
        for g in range(geo.n_kv):
            local = lowest(scores["q_heads"][g * qg : (g + 1) * qg], per_group)
            out["q_heads"] += [g * qg + j for j in local]
    return out


def removed_params(plan_layers: dict[int, dict[str, list[int]]], geos: list[LayerGeometry]) -> int:
    total = 0
    for i, rem in plan_layers.items():
        g = geos[i]
        total += len(rem["mlp"]) * g.params_per_mlp_channel()
        total += len(rem["q_heads"]) * g.params_per_q_head() + len(rem["kv_heads"]) * 2 * g.hidden * g.head_dim
    return total


def select_uniform(scores: list[dict[str, list[float]]], geos: list[LayerGeometry], layers: list[int], attention: str,
                   mlp: bool, layer_ratio: float | None, target_params: int | None,
                   offsets: list[float] | None = None, counts: str = "nearest",
                   round_to: int = 1) -> dict[int, dict[str, list[int]]]:
    """Per-layer allocation: a given unit ratio r, or the r whose removal is nearest ``target_params``.

    With ``offsets`` (OWL, AlphaPruning, ...) layer i uses r + offsets[i] instead of r; ``counts`` and ``round_to``
    are the rounding rules of ``uniform_layer`` (inside the bisection, so the rounded plan is the one nearest the target).
    """
    if mlp:
        check_round_to(round_to, geos, layers)

    def build(r: float) -> dict[int, dict[str, list[int]]]:
        return {i: uniform_layer(scores[i], geos[i], min(max(r + (offsets[i] if offsets else 0.0), 0.0), 0.99),
                                 attention, mlp, i, counts, round_to) for i in layers}

    if layer_ratio is not None:
        return build(layer_ratio)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(40):  # bisection on the per-layer ratio; rounding makes removal a step function of r
        mid = (lo + hi) / 2
        try:
            cand = build(mid)
        except WidthTargetError:
            hi = mid
            continue
        got = removed_params(cand, geos)
        if best is None or abs(got - target_params) < abs(best[1] - target_params):
            best = (cand, got)
        lo, hi = (mid, hi) if got < target_params else (lo, mid)
    if best is None or best[1] == 0:
        raise WidthTargetError("the target removes less than one unit per layer; raise the ratio")
    return best[0]


def select_global(scores: list[dict[str, list[float]]], geos: list[LayerGeometry], layers: list[int],
                  mlp: bool, attention: str, target_params: int, round_to: int = 1) -> dict[int, dict[str, list[int]]]:
    """Global allocation: lowest score first across layers, each unit weighted by its parameter cost,
    stopping at the removal nearest the target; at least one KV group and one MLP channel stay per layer.

    With ``round_to`` N > 1 the MLP units are steps of N channels (:func:`_mlp_steps`), so every kept MLP width is a
    multiple of N (or the whole layer), and the stop is the removal nearest the target in those steps."""
    if attention == "q_head":
        raise WidthTargetError("allocation: global ranks whole KV groups; use attention: kv_group (or uniform allocation)")
    if mlp:
        check_round_to(round_to, geos, layers)
    units: list[tuple[float, int, str, int, list[int]]] = []
    for i in layers:
        if attention == "kv_group":
            units += [(s, i, "kv", g, [g]) for g, s in enumerate(scores[i]["kv_groups"])]
        if mlp:
            units += _mlp_steps(scores[i]["mlp"], i, round_to)
    units.sort(key=lambda u: (u[0], u[1], u[2], u[3]))
    out = {i: {"q_heads": [], "kv_heads": [], "mlp": []} for i in layers}
    removed = 0
    for _, i, kind, j, members in units:
        g = geos[i]
        cost = g.params_per_kv_group() if kind == "kv" else g.params_per_mlp_channel() * len(members)
        if removed >= target_params or removed + cost - target_params > target_params - removed:
            break  # FLAP's threshold: every unit scoring below it goes, the removal nearest the target
        if kind == "kv":
            if len(out[i]["kv_heads"]) + 1 >= g.n_kv:
                continue
            out[i]["kv_heads"].append(j)
            out[i]["q_heads"] += [j * g.q_per_group + q for q in range(g.q_per_group)]
        else:
            if len(out[i]["mlp"]) + len(members) >= g.intermediate:
                continue
            out[i]["mlp"] += members
        removed += cost
    for rem in out.values():
        for k in rem:
            rem[k] = sorted(rem[k])
    return out


def _mlp_steps(scores: list[float], layer: int, n: int) -> list[tuple[float, int, str, int, list[int]]]:
    """A layer's MLP channels as global-ranking units: single channels (``n`` = 1, today's units), or the channels in
    ascending score cut into steps — first the ``width mod n`` lowest, then ``n`` at a time — each ranked by its mean
    score. Steps of one layer rank in order (every channel of a step scores at most those of the next), so the removed
    ones are always a prefix and the kept width a multiple of ``n``."""
    if n == 1:
        return [(s, layer, "mlp", c, [c]) for c, s in enumerate(scores)]
    order = sorted(range(len(scores)), key=lambda c: (scores[c], c))
    first = len(order) % n
    cuts = ([order[:first]] if first else []) + [order[a : a + n] for a in range(first, len(order), n)]
    return [(sum(scores[c] for c in step) / len(step), layer, "mlp", k, step) for k, step in enumerate(cuts)]


def summarize(plan_layers: dict[int, dict[str, list[int]]], geos: list[LayerGeometry]) -> list[dict[str, Any]]:
    """Per-layer kept widths (for the plan, the report and the loader)."""
    out = []
    for i, g in enumerate(geos):
        rem = plan_layers.get(i, {"q_heads": [], "kv_heads": [], "mlp": []})
        out.append({"num_attention_heads": g.n_q - len(rem["q_heads"]), "num_key_value_heads": g.n_kv - len(rem["kv_heads"]),
                    "intermediate_size": g.intermediate - len(rem["mlp"])})
        if g.experts:  # MoE layers: experts left, and each expert's width (the same in every expert)
            channels = rem.get("expert_channels") or [[]]
            out[-1].update(num_experts=g.experts - len(rem.get("experts", [])),
                           expert_intermediate_size=g.expert_intermediate - len(channels[0]))
    return out
