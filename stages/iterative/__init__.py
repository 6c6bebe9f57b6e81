"""Iterative pruning's library: prune a little, recover, re-score, repeat (``cycles``: the loop, the per-cycle plans
and their composition; ``width``: the width schedule). It uses selection, surgery and recovery, and nothing uses it
but the ``iterate`` stage (``stages/iterate.py``): a room of its own, above the three it combines."""
