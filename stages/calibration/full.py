"""The ``full`` pipeline: the whole model resident, ONE pass over the calibration batches for every criterion.

Per batch, in this order (each step only when a requested statistic needs it):

1. the block-boundary states, once, under inference mode → ``boundary``, ``removal_nll``;
2. one forward+backward of the calibration loss → ``grad``, ``fisher`` (``accumulate_gradients``), with the
   input observers attached so that the same forward also records ``activations`` / ``hessian``;
3. otherwise, for ``activations`` / ``hessian`` alone, one inference forward with the input observers attached.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from prunelab.stages.arch import adapter_for
from prunelab.stages.calibration.blocks import OBSERVED as BLOCK_NEEDS
from prunelab.stages.calibration.blocks import batches, observe_blocks, start_block_observers
from prunelab.stages.calibration.stats import NEEDS, CalibrationStats, accumulate_gradients
from prunelab.stages.calibration.width import observing_inputs, start_input_observers


def collect_stats(model: torch.nn.Module, calibration: torch.Tensor, needs: Iterable[str], batch_size: int = 1,
                  progress: bool = True) -> CalibrationStats:
    """Every statistic in ``needs`` (see ``prunelab.stages.calibration.stats``) from one pass over ``calibration``."""
    needs = set(needs)
    unknown = needs - NEEDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(NEEDS)}")
    adapter = adapter_for(model)
    stats = CalibrationStats(num_blocks=adapter.num_blocks)
    start_block_observers(stats, needs)
    inputs = bool(needs & {"activations", "hessian"})
    if inputs:
        start_input_observers(model, stats, gram="hessian" in needs)
    grads = bool(needs & {"grad", "fisher"})
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    for ids in tqdm(list(batches(calibration, batch_size)), desc="calibration pass", disable=not progress):
        if needs & BLOCK_NEEDS:
            observe_blocks(adapter, ids, stats, needs)
        if grads:
            with observing_inputs(model, stats) if inputs else nullcontext():
                accumulate_gradients(model, ids, stats, squares="fisher" in needs, every_parameter="hidden" in needs)
        elif inputs:
            with observing_inputs(model, stats), torch.inference_mode():
                model.model(input_ids=ids.to(device), use_cache=False)
    stats.seconds = time.perf_counter() - t0
    return stats
