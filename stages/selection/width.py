"""Width selection: per-unit scores + a target → which heads / KV groups / MLP channels go.

Two allocations:
- ``uniform``: every layer in range loses the same fraction of its units (the result keeps a
  vanilla config);
- ``global``: KV groups and MLP channels of all layers in range are ranked on one scale and removed
  cheapest-first, each weighted by its parameter cost (FLAP's adaptive structure, "AL-AM"); layer
  widths then differ and the model needs the prunelab loader.
"""

from __future__ import annotations

from typing import Any

import torch

from stages.calibration.width import LayerGeometry
from stages.selection.targets import round_count


class WidthTargetError(ValueError):
    """A target that cannot be met without breaking a layer (no heads left, KV groups split, ...)."""


def _lowest(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda j: (scores[j], j))[:k])


def uniform_layer(scores: dict[str, list[float]], geo: LayerGeometry, r: float, attention: str, mlp: bool, index: int) -> dict[str, list[int]]:
    """Remove fraction ``r`` of one layer's units (rounded to whole units)."""
    out: dict[str, list[int]] = {"q_heads": [], "kv_heads": [], "mlp": []}
    if mlp:
        k = round_count(r * geo.intermediate)
        if k >= geo.intermediate:
            raise WidthTargetError(f"layer {index}: ratio {r:.3f} would remove all {geo.intermediate} MLP channels")
        out["mlp"] = _lowest(scores["mlp"], k)
    if attention == "kv_group":
        k = round_count(r * geo.n_kv)
        if k >= geo.n_kv:
            raise WidthTargetError(f"layer {index}: ratio {r:.3f} would remove every head (all {geo.n_kv} KV groups); lower it")
        out["kv_heads"] = _lowest(scores["kv_groups"], k)
        qg = geo.q_per_group
        out["q_heads"] = [g * qg + j for g in out["kv_heads"] for j in range(qg)]
    elif attention == "q_head":
        per_group = round_count(r * geo.q_per_group)
        if per_group >= geo.q_per_group:
            raise WidthTargetError(f"layer {index}: ratio {r:.3f} would remove every query head of each group; lower it")
        qg = geo.q_per_group
        for g in range(geo.n_kv):
            local = _lowest(scores["q_heads"][g * qg : (g + 1) * qg], per_group)
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
                   offsets: list[float] | None = None) -> dict[int, dict[str, list[int]]]:
    """Per-layer allocation: a given unit ratio r, or the r whose removal is nearest ``target_params``.

    With ``offsets`` (OWL, AlphaPruning, ...) layer i uses r + offsets[i] instead of r.
    """
    def build(r: float) -> dict[int, dict[str, list[int]]]:
        return {i: uniform_layer(scores[i], geos[i], min(max(r + (offsets[i] if offsets else 0.0), 0.0), 0.99),
                                 attention, mlp, i) for i in layers}

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
                  mlp: bool, attention: str, target_params: int) -> dict[int, dict[str, list[int]]]:
    """Global allocation: lowest score first across layers, each unit weighted by its parameter cost,
    stopping at the removal nearest the target; at least one KV group and one MLP channel stay per layer."""
    if attention == "q_head":
        raise WidthTargetError("allocation: global ranks whole KV groups; use attention: kv_group (or uniform allocation)")
    units: list[tuple[float, int, str, int]] = []
    for i in layers:
        if attention == "kv_group":
            units += [(s, i, "kv", g) for g, s in enumerate(scores[i]["kv_groups"])]
        if mlp:
            units += [(s, i, "mlp", c) for c, s in enumerate(scores[i]["mlp"])]
    units.sort(key=lambda u: (u[0], u[1], u[2], u[3]))
    out = {i: {"q_heads": [], "kv_heads": [], "mlp": []} for i in layers}
    removed = 0
    for _, i, kind, j in units:
        g = geos[i]
        cost = g.params_per_kv_group() if kind == "kv" else g.params_per_mlp_channel()
        if removed >= target_params or removed + cost - target_params > target_params - removed:
            break  # FLAP's threshold: every unit scoring below it goes, the removal nearest the target
        if kind == "kv":
            if len(out[i]["kv_heads"]) + 1 >= g.n_kv:
                continue
            out[i]["kv_heads"].append(j)
            out[i]["q_heads"] += [j * g.q_per_group + q for q in range(g.q_per_group)]
        else:
            if len(out[i]["mlp"]) + 1 >= g.intermediate:
                continue
            out[i]["mlp"].append(j)
        removed += cost
    for rem in out.values():
        for k in rem:
            rem[k] = sorted(rem[k])
    return out


def bias_compensation(model: torch.nn.Module, plan_layers: dict[int, dict[str, list[int]]], means: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """FLAP's baseline bias (arXiv 2312.11983, Eq. 8): b' = b + W[:, S] · X̄[S] for removed input channels S.

    A removed channel's average contribution is folded into the output bias, so on average the
    layer's output is unchanged. Returned as side tensors named by parameter.
    """
    side: dict[str, torch.Tensor] = {}
    for i, name, key, lin, idx in removed_inputs(model, plan_layers):
        shift = lin.weight.detach().double()[:, idx] @ means[key][i].double()[idx]
        side[f"model.layers.{i}.{name}.bias"] = shift.to(lin.weight.dtype)
    return side


def removed_inputs(model: torch.nn.Module, plan_layers: dict[int, dict[str, list[int]]]) -> list[tuple[int, str, str, torch.nn.Linear, list[int]]]:
    """(layer, parameter path, statistics key, linear, removed input channels) for every o_proj / down_proj that loses
    inputs: the removed query heads' columns of o_proj, the removed MLP channels of down_proj. What compensation repairs."""
    out = []
    for i, rem in plan_layers.items():
        layer = model.model.layers[i]
        hd = layer.self_attn.head_dim
        cols = [h * hd + d for h in rem["q_heads"] for d in range(hd)]
        for name, key, lin, idx in (("self_attn.o_proj", "o_proj", layer.self_attn.o_proj, cols),
                                    ("mlp.down_proj", "down_proj", layer.mlp.down_proj, rem["mlp"])):
            if idx:
                out.append((i, name, key, lin, idx))
    return out


def summarize(plan_layers: dict[int, dict[str, list[int]]], geos: list[LayerGeometry]) -> list[dict[str, Any]]:
    """Per-layer kept widths (for the plan, the report and the loader)."""
    out = []
    for i, g in enumerate(geos):
        rem = plan_layers.get(i, {"q_heads": [], "kv_heads": [], "mlp": []})
        out.append({"num_attention_heads": g.n_q - len(rem["q_heads"]), "num_key_value_heads": g.n_kv - len(rem["kv_heads"]),
                    "intermediate_size": g.intermediate - len(rem["mlp"])})
    return out


def owl_offsets(model: torch.nn.Module, sq_norm: dict[str, list[torch.Tensor]], layers: list[int], m: float, lam: float) -> list[float]:
    """OWL layer allocation (Yin et al., 2023, arXiv 2310.05175, Sec. 3.2), as a per-layer ratio offset.

    Layer outlier ratio D_ℓ = |{A_ij > M · mean(A)}| / |A| over the Wanda scores A_ij = |W_ij| · ‖X_j‖₂
    of all the layer's projections. Layers richer in outliers are pruned less: the layer ratio is
    r_ℓ = r − (a_ℓ − mean(a)),  a_ℓ = 2λ (D_ℓ − min D) / (max D − min D),  so r_ℓ ∈ [r − λ, r + λ]
    and the mean over the pruned layers stays r. Returns offsets for every layer (0 outside ``layers``).
    """
    ratios = []
    for i in layers:
        layer = model.model.layers[i]
        a, mm = layer.self_attn, layer.mlp
        parts = []
        for lin, key in ((a.q_proj, "q_proj"), (a.k_proj, "q_proj"), (a.v_proj, "q_proj"), (a.o_proj, "o_proj"),
                         (mm.gate_proj, "gate_proj"), (mm.up_proj, "gate_proj"), (mm.down_proj, "down_proj")):
            parts.append((lin.weight.detach().float().abs() * sq_norm[key][i].float().sqrt()[None]).flatten())
        scores = torch.cat(parts)
        ratios.append((scores > m * scores.mean()).double().mean().item())
    # more outliers → pruned less: map −D_ℓ (equal to −(a_ℓ − mean a) after centring)
    return linear_offsets([-r for r in ratios], layers, len(model.model.layers), lam)


def linear_offsets(values: list[float], layers: list[int], num_layers: int, half_span: float) -> list[float]:
    """Per-layer ratio offsets linear in ``values`` (one per layer in ``layers``): the lowest value gets the lowest
    offset, the range is 2 × ``half_span``, the mean over ``layers`` is 0 (so the mean ratio stays r); layers
    outside ``layers`` get 0. Shared by OWL (values −D_ℓ) and AlphaPruning (values α_ℓ)."""
    v = torch.tensor(values, dtype=torch.float64)
    span = (v.max() - v.min()).item()
    mapped = torch.zeros_like(v) if span == 0 else (v - v.min()) / span * 2 * half_span
    out = [0.0] * num_layers
    for i, o in zip(layers, (mapped - mapped.mean()).tolist()):
        out[i] = o
    return out


def optimal_compensation(model: torch.nn.Module, plan_layers: dict[int, dict[str, list[int]]], grams: dict[str, list[Any]],
                         damping: float, with_bias: bool) -> dict[str, torch.Tensor]:
    """APT / OBS multi-weight removal (``stages.surgery.compensation``) for o_proj and down_proj of every pruned layer.

    Returns side tensors: the compensated kept columns as ``<param>.weight`` (shape after slicing) and, with
    ``with_bias``, the bias change as ``<param>.bias`` (added to the existing bias, like FLAP's).
    """
    from stages.surgery.compensation import optimal_layer

    side: dict[str, torch.Tensor] = {}
    for i, name, key, lin, idx in removed_inputs(model, plan_layers):
        gram, total, count = grams[key][i]
        w, b = optimal_layer(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), gram, total,
                             count, idx, damping, with_bias)
        side[f"model.layers.{i}.{name}.weight"] = w.to(lin.weight.dtype)
        if b is not None:
            old = torch.zeros_like(b) if lin.bias is None else lin.bias.detach().double()
            side[f"model.layers.{i}.{name}.bias"] = (b - old).to(lin.weight.dtype)
    return side
