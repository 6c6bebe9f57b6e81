"""What each serving engine runs, as constraints on width selection (``engines:`` of a width prune, issue 25).

A plan is only deployable where an engine can hold its shapes, so selection asks for the best plan the named
engines run instead of exporting one they refuse:

- ``transformers``: everything the prunelab loader runs (per-layer heads, KV groups, MLP widths) — no constraint.
- ``llama.cpp``: the ``deci`` architecture reads ``head_count``, ``head_count_kv`` and ``feed_forward_length``
  per layer (``src/llama-model.cpp``, ``get_key_or_arr``), so Llama-layout families (:func:`per_layer_families`)
  may vary everything per layer. Other families keep their own llama.cpp architecture (qwen3, gemma2, phi3, ...),
  which reads one global value: a plan whose layers differ is **refused** (not silently made uniform, which would
  be another allocation than the one asked for), naming ``allocation: uniform`` as the nearest setting that runs.
- ``vllm``: ``DeciLMForCausalLM`` (``nemotron_nas.py``) has one global ``num_attention_heads``; a layer's KV heads
  are ``n_heads // n_heads_in_group``. Our attention units remove query heads (a KV group takes its query heads
  with it), so every layer must keep the same number of query heads: attention is pruned **uniformly** (the same
  count of KV groups / query heads per group removed in every layer, each layer its own lowest-scoring ones), while
  MLP widths still vary per layer. An allocation that varies attention (global, owl, alpha) is constrained
  automatically: its attention share is made uniform and the MLP channels are re-selected by the same allocation for
  the rest of the parameter target (:func:`uniform_attention`). The uniform count: the counts from the floor − 1 to
  the ceiling + 1 of the unconstrained plan's mean per layer are each built (MLP re-selected for the same target) and
  the one removing the least score × parameters per removed parameter is kept (:func:`best_uniform`) — the objective
  the global ranking itself minimizes, so the choice needs no data beyond the scores and runs wherever a plan is made.
  Families other than Llama-layout run in vLLM under their own (uniform) architecture: as for llama.cpp.

Torch-free: ``--dry-run`` asks :func:`engine_refusals` before any model loads.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from prunelab.stages.arch import per_layer_families
from prunelab.stages.selection.targets import lowest  # torch-free: engines is read at --dry-run

if TYPE_CHECKING:
    from prunelab.stages.arch.base import LayerGeometry

Engine = Literal["transformers", "llama.cpp", "vllm"]
ENGINES: tuple[str, ...] = ("transformers", "llama.cpp", "vllm")
UNIFORM_ONLY_ENGINES: tuple[str, ...] = ("llama.cpp", "vllm")


def _nonuniform_sources(settings: Any) -> list[str]:
    """The width settings that give layers different widths (as a recipe spells them)."""
    out = []
    alloc = getattr(getattr(settings, "allocation", None), "type", "uniform")
    if alloc != "uniform":
        out.append(f"allocation: {alloc}")
    layers = getattr(settings, "layers", None)
    if layers is not None:
        out.append(f"layers: {list(layers)}")
    return out


def engine_refusals(model_type: str | None, settings: Any) -> list[str]:
    """Torch-free, for ``--dry-run``: width settings the named engines cannot run for ``model_type``, each naming
    the engine, the structure and the nearest setting that works. Empty where selection can honour the engines
    (perhaps by constraining attention to uniform, see the module doc)."""
    engines = list(getattr(settings, "engines", None) or ())
    if getattr(settings, "units", None) != "width" or not engines:
        return []
    problems = []
    dense = getattr(settings, "attention", "none") != "none" or getattr(settings, "mlp", False)
    sources = _nonuniform_sources(settings) if dense else []
    for engine in (e for e in engines if e in UNIFORM_ONLY_ENGINES):
        if model_type is not None and model_type not in per_layer_families(engine) and sources:
            arch, layout = (("its own architecture", "`deci`") if engine == "llama.cpp"
                            else ("its own model class", "DeciLM"))
            problems.append(
                f"engines: {engine} — {' and '.join(sources)} gives the {model_type!r} layers different widths, but "
                f"{engine} runs {model_type!r} under {arch}, which reads one head count and one MLP width for all layers "
                f"(per-layer widths run only for {', '.join(per_layer_families(engine))}, as {layout}); use allocation: uniform "
                "without `layers`, or leave this engine out")
        elif engine == "vllm" and getattr(settings, "layers", None) is not None and settings.attention != "none":
            problems.append(
                f"engines: vllm — attention: {settings.attention} with layers: {list(settings.layers)} removes query heads "
                "in those layers only, but vLLM's DeciLM has one global query-head count; remove `layers` (attention is "
                "then pruned alike in every layer) or set attention: none")
    return problems


def needs_uniform_attention(settings: Any, varies: bool) -> bool:
    """Whether selection must make attention uniform: vLLM is named, attention is pruned, and the allocation
    (``varies``: global, or per-layer ratio offsets) would give layers different query-head counts."""
    return "vllm" in (getattr(settings, "engines", None) or ()) and settings.attention != "none" and varies


def uniform_attention(chosen: dict[int, dict[str, list[int]]], scores: list[dict[str, list[float]]],
                      geos: list[LayerGeometry], layers: list[int], attention: str,
                      count: int | None = None) -> dict[int, dict[str, list[int]]]:
    """The attention part of ``chosen`` made uniform: every layer removes the rounded mean count (over ``layers``)
    of KV groups (``kv_group``) or of query heads per group (``q_head``), each layer its own lowest-scoring units —
    so every layer keeps the same query heads (vLLM's global ``num_attention_heads``); ``count`` overrides that count.
    MLP removals are dropped (``mlp: []``): the caller re-selects them for the rest of the target."""
    if attention == "kv_group":
        mean = sum(len(chosen[i]["kv_heads"]) for i in layers) / len(layers)
    else:
        mean = sum(len(chosen[i]["q_heads"]) / geos[i].n_kv for i in layers) / len(layers)
    k = math.floor(mean + 0.5) if count is None else count
    out: dict[int, dict[str, list[int]]] = {}
    for i in layers:
        g, rem = geos[i], {"q_heads": [], "kv_heads": [], "mlp": []}
        qg = g.q_per_group
        if attention == "kv_group":
            k_i = min(k, g.n_kv - 1)  # the mean of counts < n_kv is < n_kv: only differing geometries clip
            rem["kv_heads"] = lowest(scores[i]["kv_groups"], k_i)
            rem["q_heads"] = [kv * qg + j for kv in rem["kv_heads"] for j in range(qg)]
        else:
            p = min(k, qg - 1)
            for kv in range(g.n_kv):
                rem["q_heads"] += [kv * qg + j for j in lowest(scores[i]["q_heads"][kv * qg : (kv + 1) * qg], p)]
        out[i] = rem
    return out


def uniform_counts(chosen: dict[int, dict[str, list[int]]], geos: list[LayerGeometry], layers: list[int],
                   attention: str) -> list[int]:
    """The uniform counts tried around ``chosen``'s mean per layer (KV groups, or query heads per group): floor − 1 to
    ceiling + 1, within 0 and one less than every layer has. Why more than the rounded mean: on SmolLM2 at 20% FLAP's
    global plan removes 0.27 KV groups per layer, which rounds to 0 (PPL 79.07), while 1 gives 73.64 (docs/round-to.md)."""
    if attention == "kv_group":
        mean, most = (sum(len(chosen[i]["kv_heads"]) for i in layers) / len(layers), min(geos[i].n_kv for i in layers) - 1)
    else:
        mean = sum(len(chosen[i]["q_heads"]) / geos[i].n_kv for i in layers) / len(layers)
        most = min(geos[i].q_per_group for i in layers) - 1
    return sorted({min(max(k, 0), most) for k in range(math.floor(mean) - 1, math.ceil(mean) + 2)})


def removed_importance(chosen: dict[int, dict[str, list[int]]], scores: list[dict[str, list[float]]],
                       geos: list[LayerGeometry], attention: str) -> float:
    """Σ over the removed units of score × parameters (KV groups, or query heads; MLP channels) — the objective whose
    greedy minimum is the global ranking itself (lowest score first, each unit costing its parameters), so among plans
    that remove the same parameters the lower sum is the one nearer what the criterion asked for. Comparable only at
    equal removed parameters: a shift of every score by c moves each sum by c × removed parameters."""
    total = 0.0
    for i, rem in chosen.items():
        g, sc = geos[i], scores[i]
        if attention == "kv_group":
            total += sum(sc["kv_groups"][kv] for kv in rem["kv_heads"]) * g.params_per_kv_group()
        else:
            total += sum(sc["q_heads"][q] for q in rem["q_heads"]) * g.params_per_q_head()
        total += sum(sc["mlp"][c] for c in rem["mlp"]) * g.params_per_mlp_channel()
    return total


def best_uniform(candidates: dict[int, dict[int, dict[str, list[int]]]], scores: list[dict[str, list[float]]],
                 geos: list[LayerGeometry], attention: str) -> tuple[int, dict[str, float]]:
    """The count whose constrained plan (uniform attention, MLP re-selected for the rest of the same target) has the
    lowest :func:`removed_importance` per removed parameter (the plans' removed parameters differ by at most one MLP
    step); ties go to the smaller count. Returns the count and every candidate's estimate (for the log)."""
    from prunelab.stages.selection.width import removed_params  # lazy: torch-free

    est = {k: removed_importance(c, scores, geos, attention) / max(removed_params(c, geos), 1) for k, c in candidates.items()}
    return min(est, key=lambda k: (est[k], k)), est


def query_heads_uniform(shapes: list[dict[str, Any]]) -> bool:
    """Every layer with attention keeps the same query heads (a removed attention sublayer, 0 heads, is vLLM's no_op)."""
    heads = {s["num_attention_heads"] for s in shapes if s["num_attention_heads"]}
    return len(heads) <= 1 and all(s["num_attention_heads"] % s["num_key_value_heads"] == 0
                                   for s in shapes if s["num_key_value_heads"])
