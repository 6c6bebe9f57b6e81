"""Sublayer importance: how much an attention or MLP sublayer changes its residual stream (He et al., 2024).

He, Sun, Shen, Li, "What Matters in Transformers? Not All Attention is Needed", arXiv 2406.15786, Sec. 3 (the
similarity-based importance of Eq. (1), applied to Attention Drop and MLP Drop)::

    S = 1 − E_{X,t} [ cos(X_t, Y_t) ],   Y = X + F(LN(X))

X is the residual stream entering the sublayer F (attention or MLP) and Y the stream after F's output is added. We
follow the official implementation (CASE-Lab-UMD/LLM-Drop, ``layer_drop.get_layer_similarities`` with
``layer_drop_norm=True``): X is the input of the sublayer's pre-norm, Y = X + F's output, the cosine is taken per
token and averaged over every calibration token; the lowest S are dropped (one-shot, their "Attention Drop" /
"MLP Drop"; ``target_layer: all`` ranks attention and MLP scores together — our ``sublayers: both`` with
``rank: joint``). Post-norm families (OLMo 2) and residual multipliers (Granite) take Y as the residual stream
actually leaving the sublayer, which is what removing it changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prunelab.stages.core.config import StrictModel
from prunelab.stages.criteria.base import CriterionInputs, CriterionResult


class SublayerPPLSettings(StrictModel):
    """``sublayer_ppl`` (stages.criteria.sublayer_nll): how removal costs of sublayers of unequal size compare."""

    objective: Literal["per_param", "absolute"] = Field(
        "per_param", description="per_param: ΔNLL per removed parameter (the greedy knapsack ratio: the target is a "
        "parameter count and an MLP sublayer is ~3× an attention one); absolute: raw ΔNLL (SLEB's rule for equal units)")


class SublayerSLEBSettings(SublayerPPLSettings):
    """``sublayer_sleb``: SLEB's greedy at sublayer granularity, with its two economies (screening, lazy rounds)."""

    lazy: bool = Field(True, description="Minoux's lazy greedy: re-score candidates in order of their last value and "
                       "stop once the best fresh value is no higher than every other; false re-scores all every round")
    min_fresh: int = Field(3, ge=1, description="lazy rounds re-score at least this many of the best-estimated "
                           "candidates on all windows (a guard for removal costs that fall as the model shrinks)")
    screen: float = Field(0.25, gt=0, le=1, description="fraction of the calibration windows a never-scored candidate "
                          "is first estimated on (1.0: none screened, every value on all windows)")


def sublayer_cosine(inp: CriterionInputs) -> CriterionResult:
    """Per layer ``attention`` and ``mlp`` importance S = 1 − mean_t cos(X_t, Y_t) (higher = more important).

    ``scores`` (the per-block list every depth result has) is the sum of a block's two sublayer scores; selection of
    ``units: sublayers`` reads ``attention`` and ``mlp``.
    """
    s = inp.stats
    assert s.sublayer_cos_sum is not None, "sublayer_cosine needs the 'sublayers' statistics"
    imp = (1.0 - s.sublayer_cos_sum / s.sublayer_tokens).tolist()
    attention, mlp = [a for a, _ in imp], [m for _, m in imp]
    return CriterionResult(scores=[a + m for a, m in imp], extra={"attention": attention, "mlp": mlp})
