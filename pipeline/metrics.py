"""``metrics.json``: the contract that benchmarks and checks read (see shared/DESIGN.md)."""

from __future__ import annotations

import platform
import sys
from typing import TYPE_CHECKING, Any

import prunelab as pipeline
from prunelab.stages.evaluation.memory import PeakRSS, peak_memory_mb
from prunelab.stages.surgery.plan import plan_metrics

__all__ = ["PeakRSS", "build_metrics", "peak_memory_mb", "versions"]

TIMING_KEYS = ("calibrate", "score", "prune", "recover", "evaluate")

if TYPE_CHECKING:
    from prunelab.context import RunContext


def versions() -> dict[str, str]:
    import accelerate  # lazy: torch-free
    import torch  # lazy: torch-free
    import transformers  # lazy: torch-free

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "prunelab": pipeline.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
    }


def ratio_to_dense(evals: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each label's perplexity on each domain divided by the dense model's on the same protocol
    (same text, window and token count): the number that says how far a model is from dense, per domain."""
    dense = evals.get("dense", {})
    out: dict[str, dict[str, float]] = {}
    for label, results in evals.items():
        if label == "dense":
            continue
        for name, r in results.items():
            d = dense.get(name)
            if d and "ppl" in r and "ppl" in d and (r["seq_len"], r["tokens"]) == (d["seq_len"], d["tokens"]):
                out.setdefault(label, {})[name] = round(r["ppl"] / d["ppl"], 4)
    return out


def flag_recovery(recover: dict[str, Any], evals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``recover`` with ``recovery_worse_than_pruned`` (and ``worse_on``: domain → [pruned ppl, recovered ppl]) in the
    pruned model's training stats once both are evaluated on the same protocol: a "recovery" that raised perplexity
    is flagged, never reported as recovery."""
    pruned, recovered = evals.get("pruned", {}), evals.get("recovered", {})
    if "pruned" not in recover or not pruned or not recovered:
        return recover
    worse, compared = {}, 0
    for name, r in recovered.items():
        p = pruned.get(name)
        if p and "ppl" in r and "ppl" in p and (r.get("seq_len"), r.get("tokens")) == (p.get("seq_len"), p.get("tokens")):
            compared += 1
            if not r["ppl"] <= p["ppl"]:  # NaN counts as worse
                worse[name] = [p["ppl"], r["ppl"]]
    if not compared:
        return recover
    flagged = {**recover["pruned"], "recovery_worse_than_pruned": bool(worse)}
    if worse:
        flagged["worse_on"] = worse
    return {**recover, "pruned": flagged}


def build_metrics(ctx: RunContext) -> dict[str, Any]:
    info = ctx.model_info
    timing = {k: round(ctx.timings.get(k, 0.0), 3) for k in TIMING_KEYS}
    timing.update({k: round(v, 3) for k, v in ctx.timings.items() if k not in timing})
    return {
        "recipe": ctx.recipe.name,
        "model": {
            "source": info.get("source"),
            "params_before": info.get("params_before"),
            "params_after": info.get("params_after", info.get("params_before")),
            "layers_before": info.get("layers_before"),
            "layers_after": info.get("layers_after", info.get("layers_before")),
        },
        "eval": ctx.evals,
        "ratio_to_dense": ratio_to_dense(ctx.evals),
        "plan": plan_metrics(ctx.plan),  # kind, criterion, removed_blocks, removed_units, achieved_ratio
        "recover": flag_recovery(ctx.recover_info, ctx.evals),
        "scores_s": {name: r.get("seconds") for name, r in ctx.scores.items()},
        "timing_s": timing,
        "peak_memory_mb": peak_memory_mb(),
        "seed": ctx.recipe.seed,
        "versions": versions(),
    }
