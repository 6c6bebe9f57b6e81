"""LaCo — Layer Collapse (Yang, Cao & Zhao, 2024, arXiv 2402.11187): rear layers are merged into an earlier
one instead of being dropped, and a merge is kept only while the collapsed model still represents the
calibration text like the dense one.

RDSC layer merge ("Reserving Differences while Seeking Common", Eq. 2), for layer l absorbing the next m:

    θ* = θ_l + Σ_{k=1}^{m} (θ_{l+k} − θ_l)

applied to every linear weight (and bias) of the block (``prunelab.stages.surgery.merge.rdsc_merge``: it edits weights,
so it lives with the surgery that applies the plan; the trials here run it on a copy).

Trial-and-merge (Algorithm 1): start at l = H − C, try collapsing C layers (l and the C − 1 after it)
into l; if the similarity s = mean over calibration sequences of cos(h_dense, h_merged) — the
flattened last hidden states (after the final norm), as in the reference — exceeds T, keep it and
step l ← l − I, else l ← l − 1; stop below L or once the target number of removed layers is reached.
The result is a plan of merges (applied by ``prunelab.stages.surgery.apply``) and the removed layers.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelab.stages.arch import adapter_for
from prunelab.stages.calibration.blocks import batches
from prunelab.stages.criteria.base import CriterionInputs, CriterionResult
from prunelab.stages.criteria.settings import LacoSettings
from prunelab.stages.surgery.merge import rdsc_merge


def _final_states(model: torch.nn.Module, calibration: torch.Tensor, batch_size: int, skip: frozenset[int]) -> list[torch.Tensor]:
    adapter = adapter_for(model)
    out = []
    with torch.inference_mode():
        for ids in batches(calibration, batch_size):
            out.append(adapter.final_norm(adapter.boundary_states(ids, skip=skip)[-1]).float())
    return out


def similarity(reference: list[torch.Tensor], states: list[torch.Tensor]) -> float:
    """Mean over sequences of the cosine between flattened last hidden states (LaCo's s)."""
    sims = [torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1) for a, b in zip(reference, states)]
    return torch.cat(sims).mean().item()


def laco(inp: CriterionInputs) -> CriterionResult:
    """Trial-and-merge layer collapse until ``num_remove`` layers are gone (see the module docstring)."""
    assert inp.num_remove is not None and inp.calibration is not None, "laco needs num_remove and calibration data"
    opts = inp.settings or LacoSettings()
    merge_size, interval, threshold = opts.merge_layers, opts.interval, opts.threshold
    n = inp.adapter.num_blocks
    low, high = opts.layers or (0, n - 1)
    reference = _final_states(inp.model, inp.calibration, inp.batch_size, frozenset())
    work = copy.deepcopy(inp.model)
    layers = adapter_for(work).layers
    alive = list(range(n))  # original indices of the layers still in the collapsed model
    merges: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []
    removed = 0
    pos = min(high, len(alive) - 1) - merge_size
    bar = tqdm(total=inp.num_remove, desc="LaCo merges", disable=not inp.progress)
    while pos >= low and removed < inp.num_remove:
        m = min(merge_size - 1, len(alive) - 1 - pos, inp.num_remove - removed)
        if m < 1:
            pos -= 1
            continue
        base, absorbed = alive[pos], alive[pos + 1 : pos + 1 + m]
        backup = copy.deepcopy(layers[base])
        rdsc_merge(layers[base], [layers[j] for j in absorbed])
        gone = frozenset(set(range(n)) - set(alive) | set(absorbed))
        s = similarity(reference, _final_states(work, inp.calibration, inp.batch_size, gone))
        kept = s > threshold
        trials.append({"into": base, "from": absorbed, "similarity": s, "kept": kept})
        if kept:
            merges.append({"into": base, "from": absorbed, "similarity": s})
            alive = [i for i in alive if i not in set(absorbed)]
            removed += m
            bar.update(m)
            pos -= interval
            if pos >= len(alive):
                pos = len(alive) - 1 - merge_size
        else:
            layers[base] = backup
            pos -= 1
    bar.close()
    if removed < inp.num_remove:
        raise ValueError(
            f"LaCo merged away only {removed} of {inp.num_remove} layers: no further merge keeps the similarity above "
            f"threshold={threshold} (last trials: {[round(t['similarity'], 3) for t in trials[-3:]]}); lower "
            f"score.settings.laco.threshold, widen score.settings.laco.layers or lower the target"
        )
    order = [j for mg in merges for j in mg["from"]]
    scores = [0.0 if i in set(order) else 1.0 for i in range(n)]
    return CriterionResult(scores=scores, order=order, extra={"merges": merges, "trials": trials,
                                                             "settings": {"merge_layers": merge_size, "interval": interval,
                                                                          "threshold": threshold, "layers": [low, high]}})
