"""Width scoring shared by the score stage and the benchmark: which statistics a set of criteria needs, and one
criterion's unit scores from a finished statistics pass. One place, so a recipe and a bench row score alike."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any


def width_needs(names: Iterable[str], hidden: bool = False, hessian: bool = False) -> set[str]:
    """Statistics one calibration pass must collect for ``names``.

    Activation means are always collected (they feed FLAP's bias compensation); ``hidden`` adds gradients of the
    embeddings, norms and head (LLM-Pruner's channel mode); ``hessian`` adds XᵀX of o_proj/down_proj inputs for
    optimal compensation."""
    from stages.criteria.registry import WIDTH_CRITERIA

    needs = {"activations"} | set().union(*(WIDTH_CRITERIA.get(n).needs for n in names))
    return needs | ({"hidden"} if hidden else set()) | ({"hessian"} if hessian else set())


def score_width(name: str, model: Any, stats: Any, seed: int = 0, reduction: str = "sum",
                hidden: bool = False) -> dict[str, Any]:
    """One width criterion's scores: per-layer unit scores, plus hidden-channel scores when asked and defined.

    ``seconds`` charges the shared calibration pass to every data-driven criterion (it is what that criterion
    would cost alone) and nothing to the data-free ones (magnitude, random)."""
    from stages.criteria import HIDDEN_CRITERIA
    from stages.criteria.hidden import hidden_channel_scores
    from stages.criteria.registry import WIDTH_CRITERIA
    from stages.criteria.width import WidthInputs

    spec = WIDTH_CRITERIA.get(name)
    t0 = time.perf_counter()
    inputs = WidthInputs(model, stats, seed, reduction)
    result: dict[str, Any] = {"units": "width", "layers": spec.load()(inputs), "paper": spec.paper}
    if hidden and name in HIDDEN_CRITERIA:
        result["hidden"] = hidden_channel_scores(inputs, name)
    result["seconds"] = round(time.perf_counter() - t0 + (stats.seconds if spec.needs else 0.0), 3)
    return result
