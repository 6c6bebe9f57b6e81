"""Width criteria: pure functions ``(CriterionInputs) -> CriterionResult`` scoring every KV group, query head
and MLP channel of every layer.

Convention: higher = more important. Each result holds per layer ``{"q_heads": [n_q], "kv_groups":
[n_kv], "mlp": [intermediate]}``. Element-wise importances are reduced over the members of a
coupled group (q/k/v rows and o columns of a head group; gate/up rows and the down column of an
MLP channel) with LLM-Pruner's group reductions: sum (default), mean, max, prod — the ``reduction``
of the criterion's ``WidthGroupSettings``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from prunelab.stages.arch.base import STAT_KEYS, ArchAdapter, LayerGeometry
from prunelab.stages.criteria.base import CriterionInputs, CriterionResult
from prunelab.stages.criteria.expert import add_expert_scores
from prunelab.stages.criteria.settings import WidthGroupSettings

Layers = list[dict[str, list[float]]]


def reduction(inp: CriterionInputs) -> str:
    """The group reduction of a criterion with ``WidthGroupSettings`` (its default, sum, when none are given)."""
    return (inp.settings or WidthGroupSettings()).reduction


def _result(layers: Layers, inp: CriterionInputs | None = None, experts: str | None = None) -> CriterionResult:
    """A width result; with ``experts`` (magnitude | random | wanda_sp | flap) MoE layers also score their experts
    and expert channels (``prunelab.stages.criteria.expert``)."""
    if experts is not None and inp is not None:
        layers = add_expert_scores(inp, layers, experts)
    return CriterionResult(kind="width", layers=layers)


def _none() -> torch.Tensor:
    return torch.zeros(0)


# ----------------------------------------------------------------------------- group plumbing
def _role_importance(layer: torch.nn.Module, imp: Callable[[str, torch.Tensor], torch.Tensor],
                     ad: type[ArchAdapter] | ArchAdapter) -> Callable[[str], torch.Tensor]:
    """``role → imp(member path, weight)`` restricted to the role's rows (a fused matrix is scored once)."""
    fused: dict[str, torch.Tensor] = {}

    def w(role: str) -> torch.Tensor:
        if role not in ad.LINEARS:  # MoE layers: no dense MLP (experts are scored apart)
            return torch.zeros(0, 0)
        path, rows = ad.LINEARS[role], ad.role_rows(layer, role)
        if rows is None:
            return imp(path, ad.linear(layer, role).weight)
        if path not in fused:  # element-wise importances: score the fused matrix once, then take the role's rows
            fused[path] = imp(path, layer.get_submodule(path).weight)
        return fused[path][rows]

    return w


def _member_scores(layer: torch.nn.Module, geo: LayerGeometry, imp: Callable[[str, torch.Tensor], torch.Tensor],
                   ad: type[ArchAdapter] | ArchAdapter = ArchAdapter) -> dict[str, Any]:
    """Per-unit sums of an element-wise importance, one tensor per member matrix.

    ``imp(member path, weight)`` (the path inside the layer, as the adapter ``ad`` names it) returns a tensor shaped like the weight. Returns, per unit kind, a
    list of per-member contribution vectors to be reduced across members.
    """
    hd = geo.head_dim
    w = _role_importance(layer, imp, ad)
    q = w("q").sum(1).view(geo.n_q, hd).sum(1)
    k = w("k").sum(1).view(geo.n_kv, hd).sum(1)
    v = w("v").sum(1).view(geo.n_kv, hd).sum(1)
    o = w("o").sum(0).view(geo.n_q, hd).sum(1)
    gate = w("gate").sum(1)
    up = w("up").sum(1)
    down = w("down").sum(0)
    qg = geo.q_per_group
    return {
        "q_heads": [q, o],
        "kv_groups": [q.view(geo.n_kv, qg).sum(1), k, v, o.view(geo.n_kv, qg).sum(1)],
        "mlp": [gate, up, down],
    }


def reduce_parts(parts: list[torch.Tensor], how: str) -> torch.Tensor:
    """One score per unit from the per-member scores of its coupled group (``reduction``: sum | mean | max | prod)."""
    stacked = torch.stack([p.double() for p in parts])
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    if how == "prod":
        return stacked.prod(0)
    raise ValueError(f"unknown group reduction {how!r}; choose sum, mean, max or prod")


def _llm_pruner_layer(layer: torch.nn.Module, geo: LayerGeometry, imp: Callable[[str, torch.Tensor], torch.Tensor],
                      ad: type[ArchAdapter] | ArchAdapter, how: str, vector: bool = False) -> dict[str, list[float]]:
    """One layer's scores as the official LLM-Pruner (torch-pruning fork, ``TaylorImportance.__call__``) ranks them.

    A KV group's coupled members are k_proj and v_proj rows (n_kv·hd), q_proj rows and o_proj columns (n_q·hd).
    Each member gives one value per row/column (``vector``: |Σ| of the signed products, "vectorize"; otherwise
    Σ|·|, "param_first"); the longer ones are aligned to k_proj's n_kv·hd channels by ``view(q_per_group,
    n_kv·hd).sum(0)`` — channel c collects q rows c, c + n_kv·hd, … (query heads j, j + n_kv, … for KV head j,
    whereas the heads that share KV head j, and that the official code removes with it, are j·q_per_group …);
    the members are reduced per channel (``how``), and ``consecutive_groups`` sums each head's hd channels.
    MLP channels: gate/up rows and the down column, reduced per channel (the same as ``grouping: units``).
    Query heads (no official GQA counterpart) score as with ``grouping: units``.
    """
    hd, width = geo.head_dim, geo.n_kv * geo.head_dim
    w = _role_importance(layer, imp, ad)

    def per(role: str, axis: int) -> torch.Tensor:
        m = w(role).sum(axis)
        return m.abs() if vector else m

    q, k, v, o = per("q", 1), per("k", 1), per("v", 1), per("o", 0)
    channels = [k, v, q.view(-1, width).sum(0), o.view(-1, width).sum(0)]
    heads = [q.view(geo.n_q, hd).sum(1), o.view(geo.n_q, hd).sum(1)]
    return {
        "q_heads": reduce_parts(heads, how).tolist(),
        "kv_groups": reduce_parts(channels, how).view(geo.n_kv, hd).sum(1).tolist(),
        "mlp": reduce_parts([per("gate", 1), per("up", 1), per("down", 0)], how).tolist(),
    }


def _grouping(inp: CriterionInputs) -> str:
    return (inp.settings or WidthGroupSettings()).grouping


def _elementwise(inp: CriterionInputs, imp: Callable[[int, str, torch.Tensor], torch.Tensor], how: str) -> Layers:
    out, ad = [], inp.adapter
    for i, layer in enumerate(ad.layers):
        geo = ad.geometry(layer)
        fn = lambda name, w, i=i: imp(i, name, w.detach().float())
        if _grouping(inp) == "llm_pruner":
            out.append(_llm_pruner_layer(layer, geo, fn, ad, how))
            continue
        members = _member_scores(layer, geo, fn, ad)
        out.append({kind: reduce_parts(parts, how).tolist() for kind, parts in members.items()})
    return out


def _grad(ad: ArchAdapter, i: int, name: str, table: Any) -> torch.Tensor:
    return table[f"{ad.block_prefix(i)}.{name}.weight"]


# ----------------------------------------------------------------------------- criteria
def magnitude(inp: CriterionInputs) -> CriterionResult:
    """Magnitude baseline (L2): I(G) = ‖W_G‖₂ = sqrt(Σ_{w ∈ G} w²) over every weight of the group."""
    sq = _elementwise(inp, lambda i, n, w: w * w, "sum")
    return _result([{k: [v**0.5 for v in vals] for k, vals in layer.items()} for layer in sq], inp, "magnitude")


def magnitude_l1(inp: CriterionInputs) -> CriterionResult:
    """Magnitude baseline (L1): I(G) = Σ_{w ∈ G} |w|, reduced over the group's members."""
    return _result(_elementwise(inp, lambda i, n, w: w.abs(), reduction(inp)))


def random(inp: CriterionInputs) -> CriterionResult:
    """Random baseline: i.i.d. uniform scores from the recipe seed."""
    gen = torch.Generator().manual_seed(inp.seed)
    out = []
    for geo in inp.adapter.geometries():
        out.append({k: torch.rand(n, generator=gen, dtype=torch.float64).tolist()
                    for k, n in (("q_heads", geo.n_q), ("kv_groups", geo.n_kv), ("mlp", geo.intermediate))})
    return _result(out, inp, "random")


def taylor(inp: CriterionInputs) -> CriterionResult:
    """LLM-Pruner element-wise first order (Ma et al., 2023, arXiv 2305.11627, Eq. 4–5):

        I(W_k^i) = | ∂L(D)/∂W_k^i · W_k^i |,   I(G) = Σ_{i,k ∈ G} I(W_k^i)   (group "sum")

    with ∂L/∂W the mean calibration-loss gradient (one forward+backward per batch).
    """
    grad, ad = inp.stats.grad_mean, inp.adapter
    return _result(_elementwise(inp, lambda i, n, w: (w * _grad(ad, i, n, grad)).abs(), reduction(inp)))


def taylor_element2(inp: CriterionInputs) -> CriterionResult:
    """LLM-Pruner element-wise second order (arXiv 2305.11627, Eq. 5), Hessian ≈ Fisher diagonal:

        I(W_k^i) = | ∂L/∂W_k^i · W_k^i − ½ · W_k^i · F_kk · W_k^i |,   F = (1/N) Σ_n (∂L_n/∂W)²

    (LLM-Pruner's ``param_mix``; the sign inside |·| does not matter).
    """
    grad, fisher, ad = inp.stats.grad_mean, inp.stats.fisher, inp.adapter

    def imp(i: int, n: str, w: torch.Tensor) -> torch.Tensor:
        g, f = _grad(ad, i, n, grad), _grad(ad, i, n, fisher)
        return (w * g - 0.5 * w * f * w).abs()

    return _result(_elementwise(inp, imp, reduction(inp)))


def taylor_vector(inp: CriterionInputs) -> CriterionResult:
    """LLM-Pruner vector-wise (arXiv 2305.11627, Eq. 3): I(W_i) = | Σ_k ∂L/∂W_i,k · W_i,k | per member
    vector (a head's rows or columns in one matrix, a channel's row or column), reduced over members."""
    out, grad, how, ad = [], inp.stats.grad_mean, reduction(inp), inp.adapter
    for i, layer in enumerate(ad.layers):
        geo = ad.geometry(layer)
        fn = lambda n, w, i=i: w.detach().float() * _grad(ad, i, n, grad)
        if _grouping(inp) == "llm_pruner":
            out.append(_llm_pruner_layer(layer, geo, fn, ad, how, vector=True))
            continue
        signed = _member_scores(layer, geo, fn, ad)
        out.append({kind: reduce_parts([p.abs() for p in parts], how).tolist() for kind, parts in signed.items()})
    return _result(out)


def wanda_sp(inp: CriterionInputs) -> CriterionResult:
    """Wanda-sp (structured Wanda, as in An et al., 2024, arXiv 2312.11983, baseline; Sun et al. 2023):

        S_j = mean_i |W_ij| · ‖X_j‖₂   for input channel j of o_proj / down_proj,

    summed over a head's (or KV group's) channels; an MLP channel's score is its S_j.
    """
    out, ad, xo, xd = [], inp.adapter, inp.stats.inputs[STAT_KEYS["o"]], inp.stats.inputs[STAT_KEYS["down"]]
    for i, layer in enumerate(ad.layers):
        geo = ad.geometry(layer)
        so = ad.linear(layer, "o").weight.detach().double().abs().mean(0) * xo[i].sq_norm.sqrt()
        sd = ad.linear(layer, "down").weight.detach().double().abs().mean(0) * xd[i].sq_norm.sqrt() if geo.intermediate else _none()
        heads = so.view(geo.n_q, geo.head_dim).sum(1)
        out.append({"q_heads": heads.tolist(), "kv_groups": heads.view(geo.n_kv, -1).sum(1).tolist(), "mlp": sd.tolist()})
    return _result(out, inp, "wanda_sp")


def flap(inp: CriterionInputs) -> CriterionResult:
    """FLAP fluctuation metric, WIFV (An et al., 2024, arXiv 2312.11983, Eq. 5), standardized:

        S_j = (1/(N−1)) Σ_n (X_n,j − X̄_j)² · ‖W_:,j‖²₂

    for input channel j of o_proj / down_proj. As in the official code, the attention metric is
    squared before standardization; each layer's attention channels and MLP channels are
    standardized separately, (S − mean)/std (Eq. 7), so heads and channels of all layers compete
    on one scale (adaptive structure); a head (KV group) scores the mean of its channels.
    """
    out, ad, xo, xd = [], inp.adapter, inp.stats.inputs[STAT_KEYS["o"]], inp.stats.inputs[STAT_KEYS["down"]]
    for i, layer in enumerate(ad.layers):
        geo = ad.geometry(layer)
        wo = ad.linear(layer, "o").weight.detach().double().pow(2).sum(0)
        attn = _standardize((xo[i].variance * wo) ** 2)
        if geo.intermediate:
            mlp = _standardize(xd[i].variance * ad.linear(layer, "down").weight.detach().double().pow(2).sum(0))
        else:  # MoE layers: no dense MLP
            mlp = _none()
        out.append({
            "q_heads": attn.view(geo.n_q, geo.head_dim).mean(1).tolist(),
            "kv_groups": attn.view(geo.n_kv, -1).mean(1).tolist(),
            "mlp": mlp.tolist(),
        })
    return _result(out, inp, "flap")


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12)
