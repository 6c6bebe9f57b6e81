"""Layer merges: LaCo's RDSC merge (Yang, Cao & Zhao, 2024, arXiv 2402.11187, Eq. 2), "Reserving Differences
while Seeking Common". For layer l absorbing the next m:

    θ* = θ_l + Σ_{k=1}^{m} (θ_{l+k} − θ_l)

applied to every linear weight (and bias) of the block; the norms keep layer l's weights, as in the
authors' notebook. (That notebook accumulates the differences against the already-updated θ_l, which
leaves θ_{l+m}; we implement the paper's formula.) The LaCo criterion (``prunelab.stages.criteria.laco``) tries merges
on a copy of the model; ``prunelab.stages.surgery.apply`` replays the kept ones from the plan.
"""

from __future__ import annotations

import torch


def rdsc_merge(base: torch.nn.Module, others: list[torch.nn.Module]) -> None:
    """θ_base ← θ_base + Σ_k (θ_k − θ_base) for every Linear of the block, in place (float64 sums)."""
    for name, lin in base.named_modules():
        if not isinstance(lin, torch.nn.Linear):
            continue
        for attr in ("weight", "bias"):
            p = getattr(lin, attr)
            if p is None:
                continue
            w = p.data.double()
            delta = sum(getattr(o.get_submodule(name), attr).data.double() - w for o in others)
            p.data.copy_((w + delta).to(p.dtype))
