"""Criterion registry. Entries resolve lazily ("module:function") so recipe validation stays torch-free."""

from pipeline.registry import CRITERIA, register_criterion

_DEPTH = "stages.criteria.depth"

register_criterion("block_influence", f"{_DEPTH}:block_influence", "block", {"boundary"}, paper="ShortGPT, arXiv 2403.03853")
register_criterion("angular_distance", f"{_DEPTH}:angular_distance", "block", {"boundary"}, paper="Gromov et al., arXiv 2403.17887")
register_criterion("ppl", f"{_DEPTH}:ppl", "block", {"removal_nll"}, paper="Shortened LLaMA, arXiv 2402.02834")
register_criterion("taylor_plus", f"{_DEPTH}:taylor_plus", "block", {"grad"}, paper="Shortened LLaMA, arXiv 2402.02834")
register_criterion("sleb", f"{_DEPTH}:sleb", "block", {"removal_nll"}, iterative=True, paper="SLEB, arXiv 2402.09025")
register_criterion("magnitude", f"{_DEPTH}:magnitude", "block", paper="baseline")
register_criterion("random", f"{_DEPTH}:random", "block", paper="baseline")

__all__ = ["CRITERIA"]
