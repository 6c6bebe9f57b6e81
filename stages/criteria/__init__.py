"""Criterion registry. Entries resolve lazily ("module:function") so recipe validation stays torch-free."""

from stages.criteria.registry import CRITERIA, WIDTH_CRITERIA, register_criterion

_DEPTH = "stages.criteria.depth"

register_criterion("block_influence", f"{_DEPTH}:block_influence", "block", {"boundary"}, paper="ShortGPT, arXiv 2403.03853")
register_criterion("angular_distance", f"{_DEPTH}:angular_distance", "block", {"boundary"}, paper="Gromov et al., arXiv 2403.17887")
register_criterion("ppl", f"{_DEPTH}:ppl", "block", {"removal_nll"}, paper="Shortened LLaMA, arXiv 2402.02834")
register_criterion("taylor_plus", f"{_DEPTH}:taylor_plus", "block", {"grad"}, paper="Shortened LLaMA, arXiv 2402.02834")
register_criterion("sleb", f"{_DEPTH}:sleb", "block", {"removal_nll"}, iterative=True, paper="SLEB, arXiv 2402.09025")
register_criterion("laco", "stages.criteria.laco:laco", "block", {"calibration"}, iterative=True, paper="LaCo, arXiv 2402.11187")
register_criterion("magnitude", f"{_DEPTH}:magnitude", "block", paper="baseline")
register_criterion("random", f"{_DEPTH}:random", "block", paper="baseline")

_WIDTH = "stages.criteria.width"
_LLMP = "LLM-Pruner, arXiv 2305.11627"

register_criterion("magnitude", f"{_WIDTH}:magnitude", "width", paper="baseline (L2 of the group)")
register_criterion("magnitude_l1", f"{_WIDTH}:magnitude_l1", "width", paper="baseline (L1 of the group)")
register_criterion("random", f"{_WIDTH}:random", "width", paper="baseline")
register_criterion("taylor", f"{_WIDTH}:taylor", "width", {"grad"}, paper=f"{_LLMP}, element1")
register_criterion("taylor_element2", f"{_WIDTH}:taylor_element2", "width", {"grad", "fisher"}, paper=f"{_LLMP}, element2")
register_criterion("taylor_vector", f"{_WIDTH}:taylor_vector", "width", {"grad"}, paper=f"{_LLMP}, vector-wise")
register_criterion("wanda_sp", f"{_WIDTH}:wanda_sp", "width", {"activations"}, paper="Wanda-sp, arXiv 2312.11983")
register_criterion("flap", f"{_WIDTH}:flap", "width", {"activations"}, paper="FLAP, arXiv 2312.11983")

# Width criteria that also define a hidden-channel importance (LLM-Pruner's "channel" mode, stages.criteria.hidden);
# Wanda-sp and FLAP score o_proj/down_proj inputs and have none.
HIDDEN_CRITERIA = ("magnitude", "magnitude_l1", "random", "taylor", "taylor_element2", "taylor_vector")

__all__ = ["CRITERIA", "HIDDEN_CRITERIA", "WIDTH_CRITERIA"]
