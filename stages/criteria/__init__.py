"""Every criterion, registered with one call each: name, score function, kind, needed statistics, settings, paper.

Score functions resolve lazily ("module:function") so validating a recipe stays torch-free.
"""

from prunelab.stages.criteria.registry import CRITERIA, WIDTH_UNITS, criteria_for, hidden_criteria, register_criterion
from prunelab.stages.criteria.settings import LacoSettings, WidthGroupSettings
from prunelab.stages.criteria.sublayer import SublayerPPLSettings, SublayerSLEBSettings

_DEPTH = "prunelab.stages.criteria.depth"

register_criterion("block_influence", f"{_DEPTH}:block_influence", "depth", {"boundary"}, paper="ShortGPT, arXiv 2403.03853")
register_criterion("angular_distance", f"{_DEPTH}:angular_distance", "depth", {"boundary"}, paper="Gromov et al., arXiv 2403.17887")
register_criterion("ppl", f"{_DEPTH}:ppl", "depth", {"removal_nll"}, paper="Shortened LLaMA, arXiv 2402.02834")
register_criterion("taylor_plus", f"{_DEPTH}:taylor_plus", "depth", {"grad"}, paper="Shortened LLaMA, arXiv 2402.02834")
register_criterion("sleb", f"{_DEPTH}:sleb", "depth", {"removal_nll"}, iterative=True, paper="SLEB, arXiv 2402.09025")
register_criterion("laco", "prunelab.stages.criteria.laco:laco", "depth", {"merge_trials"}, settings=LacoSettings, iterative=True,
                   paper="LaCo, arXiv 2402.11187")
register_criterion("sublayer_cosine", "prunelab.stages.criteria.sublayer:sublayer_cosine", "depth", {"sublayers"},
                   paper="He et al., What Matters in Transformers? Not All Attention is Needed, arXiv 2406.15786")
_SUB = "prunelab.stages.criteria.sublayer_nll"
register_criterion("sublayer_ppl", f"{_SUB}:sublayer_ppl", "depth", {"calibration"}, settings=SublayerPPLSettings,
                   paper="Shortened LLaMA PPL criterion (arXiv 2402.02834) over He et al.'s sublayers (arXiv 2406.15786)")
register_criterion("sublayer_sleb", f"{_SUB}:sublayer_sleb", "depth", {"calibration"}, settings=SublayerSLEBSettings,
                   iterative=True, paper="SLEB Alg. 1 (arXiv 2402.09025) over He et al.'s sublayers (arXiv 2406.15786)")
register_criterion("magnitude", f"{_DEPTH}:magnitude", "depth", paper="baseline")
register_criterion("random", f"{_DEPTH}:random", "depth", paper="baseline")

# Width criteria. Those with a `hidden` form also score hidden channels (LLM-Pruner's "channel" mode,
# stages.criteria.hidden); Wanda-sp and FLAP score o_proj/down_proj inputs and have none. WidthGroupSettings
# (the group `reduction`) belongs to the criteria that reduce element-wise importances over group members;
# magnitude's L2 norm is the root of the summed squares whatever the reduction, so it has no settings.
_WIDTH, _HIDDEN = "prunelab.stages.criteria.width", "prunelab.stages.criteria.hidden"
_LLMP = "LLM-Pruner, arXiv 2305.11627"
_GROUP = WidthGroupSettings
# On mixture-of-experts layers (stages.criteria.expert): magnitude and random also score experts and expert channels,
# Wanda-sp and FLAP expert channels (from routed-token statistics); REAP and frequency × norm score experts only.
_ALL, _CHANNELS = (*WIDTH_UNITS, "experts", "expert_channels"), (*WIDTH_UNITS, "expert_channels")

register_criterion("magnitude", f"{_WIDTH}:magnitude", "width", hidden=f"{_HIDDEN}:magnitude", paper="baseline (L2 of the group)",
                   units=_ALL)
register_criterion("magnitude_l1", f"{_WIDTH}:magnitude_l1", "width", settings=_GROUP, hidden=f"{_HIDDEN}:magnitude_l1",
                   paper="baseline (L1 of the group)")
register_criterion("random", f"{_WIDTH}:random", "width", hidden=f"{_HIDDEN}:random", paper="baseline", units=_ALL)
register_criterion("taylor", f"{_WIDTH}:taylor", "width", {"grad"}, settings=_GROUP, hidden=f"{_HIDDEN}:taylor",
                   paper=f"{_LLMP}, element1")
register_criterion("taylor_element2", f"{_WIDTH}:taylor_element2", "width", {"grad", "fisher"}, settings=_GROUP,
                   hidden=f"{_HIDDEN}:taylor_element2", paper=f"{_LLMP}, element2")
register_criterion("taylor_vector", f"{_WIDTH}:taylor_vector", "width", {"grad"}, settings=_GROUP,
                   hidden=f"{_HIDDEN}:taylor_vector", paper=f"{_LLMP}, vector-wise")
register_criterion("wanda_sp", f"{_WIDTH}:wanda_sp", "width", {"activations"}, paper="Wanda-sp, arXiv 2312.11983",
                   units=_CHANNELS)
register_criterion("flap", f"{_WIDTH}:flap", "width", {"activations"}, paper="FLAP, arXiv 2312.11983", units=_CHANNELS)
# Experts only; the routing statistics are observed with the projection inputs ("activations").
_EXPERT = "prunelab.stages.criteria.expert"
register_criterion("expert_frequency_norm", f"{_EXPERT}:expert_frequency_norm", "width", {"activations"},
                   paper="router top-k frequency × mean expert output norm (baseline)", units=("experts",))
register_criterion("reap", f"{_EXPERT}:reap", "width", {"activations"},
                   paper="REAP, Lasby et al., arXiv 2510.13999", units=("experts",))

HIDDEN_CRITERIA = tuple(hidden_criteria())

__all__ = ["CRITERIA", "HIDDEN_CRITERIA", "criteria_for", "register_criterion"]
