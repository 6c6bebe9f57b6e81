"""The ``full`` pipeline: the whole model resident, ONE pass over the calibration batches for every criterion.

Per batch, in this order (each step only when an observer of a requested statistic needs it):

1. the block-boundary states, once, under inference mode, with the state observers' hooks attached →
   ``boundary``, ``sublayers``, ``removal_nll``;
2. one forward+backward of the calibration loss → ``grad``, ``fisher``, ``hidden``, with the input observers
   attached so that the same forward also records ``activations`` / ``hessian``;
3. otherwise, for ``activations`` / ``hessian`` alone, one inference forward of the decoder body with the input
   observers attached.

Which statistic is collected how is the observers' business (``prunelab.stages.calibration.observers``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from prunelab.stages.arch import adapter_for
from prunelab.stages.arch.base import ArchAdapter
from prunelab.stages.calibration.blocks import batches
from prunelab.stages.calibration.observers import Observer, start_observers
from prunelab.stages.calibration.stats import CalibrationStats


@contextmanager
def attached(observers: list[Observer], adapter: ArchAdapter) -> Iterator[None]:
    """The observers' module hooks on every block, removed on the way out (errors included)."""
    handles = []
    try:
        for i, layer in enumerate(adapter.layers):
            for o in observers:
                handles += o.hooks(i, layer)
        yield
    finally:
        for h in handles:
            h.remove()


def collect_stats(model: torch.nn.Module, calibration: torch.Tensor, needs: Iterable[str], batch_size: int = 1,
                  progress: bool = True) -> CalibrationStats:
    """Every statistic in ``needs`` (``prunelab.stages.calibration.needs``) from one pass over ``calibration``."""
    adapter = adapter_for(model)
    stats = CalibrationStats(num_blocks=adapter.num_blocks)
    observers = start_observers(needs, stats, adapter)
    on_states = [o for o in observers if o.STATES]
    on_inputs = [o for o in observers if o.FORWARD]
    on_backward = [o for o in observers if o.BACKWARD]
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    for b, ids in enumerate(tqdm(list(batches(calibration, batch_size)), desc="calibration pass", disable=not progress)):
        if on_states:
            with torch.inference_mode():
                with attached(on_states, adapter):
                    states = adapter.boundary_states(ids)
                for i in range(len(states) - 1):
                    for o in on_states:
                        o.after_block(i, states[i], states[i + 1], b)
                for o in on_states:  # hooks off: these re-run blocks on the cached states
                    o.after_batch(states, ids, b)
        if on_backward:
            with attached(on_inputs, adapter):
                for o in on_backward:
                    o.backward(model, ids)
        elif on_inputs:
            with attached(on_inputs, adapter), torch.inference_mode():
                adapter.final_states(ids.to(device))
    for o in observers:
        o.finish()
    stats.seconds = time.perf_counter() - t0
    return stats
