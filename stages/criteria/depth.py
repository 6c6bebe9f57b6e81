"""Block (depth) importance criteria: pure functions ``(CriterionInputs) -> CriterionResult``.

Convention: a higher score means more important (kept longer). Criteria that do not rank blocks
independently say so in their result: SLEB returns a removal ``order``; the angular distance returns
``windows`` (distance of every window of n consecutive blocks, for every n).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelab.stages.calibration.blocks import batches, removal_nll_batch
from prunelab.stages.calibration.sequential import collect_sequential
from prunelab.stages.criteria.base import CriterionInputs, CriterionResult


def block_influence(inp: CriterionInputs) -> CriterionResult:
    """ShortGPT (Men et al., 2024, arXiv 2403.03853), Eq. (1):

        BI_i = 1 − E_{X,t} [ X_{i,t}ᵀ X_{i+1,t} / (‖X_{i,t}‖₂ ‖X_{i+1,t}‖₂) ]

    X_i is the input of block i and X_{i+1} its output, over every calibration token t. Blocks
    with the lowest BI change their input least and are removed first.
    """
    s = inp.stats
    assert s.bi_cos_sum is not None, "block_influence needs the 'boundary' statistics"
    return CriterionResult(scores=(1.0 - s.bi_cos_sum / s.bi_tokens).tolist())


def angular_distance(inp: CriterionInputs) -> CriterionResult:
    """Gromov et al. (2024, arXiv 2403.17887), Eq. (7):

        d(x^(ℓ), x^(ℓ+n)) = (1/π) · arccos( x_T^(ℓ)·x_T^(ℓ+n) / (‖x_T^(ℓ)‖ ‖x_T^(ℓ+n)‖) )

    at the last token T, averaged over calibration samples. To remove n blocks, drop the window
    ℓ* … ℓ*+n−1 with ℓ* = argmin_ℓ d(x^(ℓ), x^(ℓ+n)). ``windows[n][ℓ]`` holds d for every n and ℓ;
    ``scores`` are the single-block distances (n = 1) for plots.
    """
    s = inp.stats
    assert s.angular_sum is not None, "angular_distance needs the 'boundary' statistics"
    d = (s.angular_sum / s.angular_samples).tolist()
    n_blocks = s.num_blocks
    windows = {n: [d[ell][ell + n] for ell in range(n_blocks - n + 1)] for n in range(1, n_blocks)}
    return CriterionResult(scores=list(windows[1]), windows=windows)


def ppl(inp: CriterionInputs) -> CriterionResult:
    """Shortened LLaMA PPL criterion (Kim et al., 2024, arXiv 2402.02834, Sec. 3.2):

        I_PPL(n) = exp{ −(1/SK) Σ_s Σ_k log p_{θ∖block n}(x_k^s | x_{<k}^s) }

    the calibration perplexity of the model with block n removed; blocks whose removal raises it
    least are removed first. Hidden states entering each block are cached (see ``stats``).
    """
    s = inp.stats
    assert s.removal_nll is not None, "ppl needs the 'removal_nll' statistics"
    scores = torch.exp(s.removal_nll / s.nll_tokens).tolist()
    return CriterionResult(scores=scores, extra={"dense_calibration_ppl": math.exp(s.dense_nll / s.nll_tokens)})


TAYLOR_PLUS_KEEP_FIRST = 4
TAYLOR_PLUS_KEEP_LAST = 2


def taylor_plus(inp: CriterionInputs) -> CriterionResult:
    """Shortened LLaMA Taylor+ (Kim et al., 2024, arXiv 2402.02834, Sec. 3.2):

        I_Taylor(n) = Σ_{W ∈ block n} Σ_{i,k} | (∂L(D)/∂W_{i,k}) · W_{i,k} |

    with ∂L/∂W summed over calibration batches (the first-order estimate of |L(W) − L(W=0)|), over
    every weight matrix and norm weight of the block. The "+" is the paper's heuristic of keeping
    the first four and the last two blocks, which Taylor alone tends to remove (protected here).
    """
    grads = inp.stats.grad_sum
    assert grads, "taylor_plus needs the 'grad' statistics"
    scores = []
    for i, layer in enumerate(inp.adapter.layers):
        total = 0.0
        for name, p in layer.named_parameters():
            if not name.endswith("weight"):
                continue
            g = grads[f"{inp.adapter.block_prefix(i)}.{name}"]
            total += (p.detach().float() * g).abs().sum().item()
        scores.append(total)
    n = len(scores)
    protected = sorted(set(range(min(TAYLOR_PLUS_KEEP_FIRST, n))) | set(range(max(n - TAYLOR_PLUS_KEEP_LAST, 0), n)))
    raw = list(scores)
    for i in protected:
        scores[i] = math.inf
    return CriterionResult(scores=scores, protected=protected, extra={"taylor_raw": raw})


def sleb(inp: CriterionInputs) -> CriterionResult:
    """SLEB (Song et al., 2024, arXiv 2402.09025, Algorithm 1): iterative block elimination.

        for t = 1 … n:  i* = argmin_{i ∈ kept} PPL_calib(model ∖ (removed ∪ {i}));  removed ← removed ∪ {i*}

    Re-scoring after every removal captures interactions that a one-shot score misses. The first
    round equals the PPL criterion and re-uses its statistics; each round caches the hidden states
    entering every kept block, so no block before a candidate is recomputed.
    """
    assert inp.num_remove is not None and inp.calibration is not None, "sleb needs num_remove and calibration data"
    s = inp.stats
    kept = list(range(s.num_blocks))
    order: list[int] = []
    rounds: list[dict[str, Any]] = []
    first = s.removal_nll.tolist() if s.removal_nll is not None else None
    for _ in tqdm(range(inp.num_remove), desc="SLEB rounds", disable=not inp.progress):
        t0 = time.perf_counter()
        if first is not None and not order:
            nll, tokens = first, s.nll_tokens
        else:
            nll, tokens = _removal_nll(inp, kept)
        best = min(range(len(kept)), key=lambda p: (nll[p], kept[p]))
        rounds.append({"kept": list(kept), "ppl": [math.exp(v / tokens) for v in nll], "seconds": time.perf_counter() - t0})
        order.append(kept.pop(best))
    rank = {b: r for r, b in enumerate(order)}
    # Blocks removed earlier are less important; never-removed blocks rank above all removed ones.
    scores = [float(rank[b]) if b in rank else float(s.num_blocks) for b in range(s.num_blocks)]
    return CriterionResult(scores=scores, order=order, extra={"rounds": rounds})


def _removal_nll(inp: CriterionInputs, kept: list[int]) -> tuple[list[float], int]:
    """One SLEB round: the calibration NLL with each kept block removed, on the model without the removed ones —
    through the sequential pipeline (one block resident, the wavefront carried block by block) when the recipe
    calibrates sequentially, else from each batch's boundary states."""
    skip = frozenset(set(range(inp.stats.num_blocks)) - set(kept))
    if getattr(inp.pipeline, "type", "full") == "sequential":
        stats = collect_sequential(inp.model, inp.calibration, {"removal_nll"}, inp.batch_size, False, inp.pipeline,
                                   skip=skip)
        assert stats.removal_nll is not None
        return stats.removal_nll[kept].tolist(), stats.nll_tokens
    totals = [0.0] * len(kept)
    tokens = 0
    for ids in batches(inp.calibration, inp.batch_size):
        with torch.inference_mode():
            states = inp.adapter.boundary_states(ids, skip=skip)
        for p, v in enumerate(removal_nll_batch(inp.adapter, states, kept, ids)):
            totals[p] += v
        tokens += ids[:, 1:].numel()
    return totals, tokens


def magnitude(inp: CriterionInputs) -> CriterionResult:
    """Magnitude baseline: I(n) = Σ_{W ∈ block n} ‖W‖₁ (data-free; blocks are equal in size)."""
    return CriterionResult(
        scores=[sum(p.detach().float().abs().sum().item() for p in layer.parameters()) for layer in inp.adapter.layers]
    )


def random(inp: CriterionInputs) -> CriterionResult:
    """Random baseline: i.i.d. uniform scores from the recipe seed (the floor any criterion must beat)."""
    gen = torch.Generator().manual_seed(inp.seed)
    return CriterionResult(scores=torch.rand(inp.stats.num_blocks, generator=gen, dtype=torch.float64).tolist())
