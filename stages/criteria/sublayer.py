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

from prunelab.stages.criteria.base import CriterionInputs, CriterionResult


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
