"""Fisher weights of every block output for block-local reconstruction's ``loss: fisher`` (BRECQ).

Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction", ICLR 2021, Sec. 3.3,
Eq. (10): a block's reconstruction error is weighted by the diagonal Fisher of its output z,

    min E[ Δzᵀ diag((∂L/∂z_1)², …, (∂L/∂z_a)²) Δz ],

the second-order Taylor term of the task loss L when the Hessian of L in z is approximated by the Fisher (the square
of each sample's gradient). Plain MSE treats every channel of every token alike; this spends a block's capacity on
the errors that move the model's next-token loss. Here L is the DENSE model's calibration NLL (mean next-token
cross-entropy, the full pipeline's gradient loss) and z the residual stream leaving block i, so every block's weights
come from one gradient pass before the reconstruction starts; BRECQ's own code takes the gradients of the model being
quantized (``save_grad_data``): we take the dense model's because it is the reconstruction's target, and because a
gradient of the pruned model at block i would change as blocks below it are reconstructed.

How: the teacher's forward keeps its boundary states at the checkpoints, and the block-wise backward
(:func:`prunelab.stages.calibration.backward.blockwise_backward`, one block resident, no weight gradients) hands over
∂L/∂x_{i+1} of every batch; its square (each batch's gradient scaled by its window count, so a short last batch is
not weighted up) goes into a per-window cache for block i. Memory: the weights of all L outputs share one budget
(``MemoryPool``), past it memory-mapped files — the size of L boundary states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunelab.stages.arch.base import ArchAdapter
from prunelab.stages.calibration.backward import blockwise_backward, checkpoint_interval, is_checkpoint
from prunelab.stages.calibration.blocks import run_over_batches
from prunelab.stages.calibration.sequential import BlockWeights, BoundaryCache, MemoryPool


class _NoWeightGradients:
    """The gradient observer the block-wise backward expects, collecting nothing: only ∂L/∂x is wanted here."""

    every_parameter = False
    names: tuple[str, ...] = ()

    def fold(self, _named: Any) -> None:
        return None

    def batches_done(self, _count: int) -> None:
        return None


def output_fishers(adapter: ArchAdapter, windows: torch.Tensor, chunks: list[list[int]], weights: BlockWeights,
                   inputs: Any, budget: float, folder: Path, progress: bool = True) -> list[BoundaryCache]:
    """Per block i, a cache of (∂L/∂z_i)² per window (``put(window, [1, T, H])``) for the dense model ``adapter``
    on ``windows`` in batches ``chunks``; ``inputs(x)``: the block inputs of a state's shape."""
    n = adapter.num_blocks
    every = checkpoint_interval(None, n)
    work = MemoryPool(budget)

    def new_cache(tag: str) -> BoundaryCache:
        return BoundaryCache(budget, folder, f"fisher-{tag}", work)

    ids = [windows[idx] for idx in chunks]
    states: list[BoundaryCache | None] = [None] * (n + 1)
    x0 = new_cache("x0")
    with torch.no_grad(), weights.embedding(adapter):
        for b, batch in enumerate(ids):
            x0.put(b, adapter.embed(batch))
    states[0], current = x0, x0
    for i in range(n):
        following = new_cache(f"x{i + 1}")
        with torch.no_grad(), weights.block(adapter, i):
            run_over_batches(adapter, i, current, following, len(ids), inputs)
        if not is_checkpoint(i, every) and i > 0:  # x_0 and x_L are always kept
            current.clear()
            states[i] = None
        states[i + 1], current = following, following
    pool = MemoryPool(budget)
    fishers = [BoundaryCache(budget, folder, f"fisher-{i}", pool) for i in range(n)]

    def keep(i: int, grads: BoundaryCache) -> None:
        for b, idx in enumerate(chunks):
            g = grads.get(b).float() * len(idx)  # the loss is a batch mean: undo the 1/batch of its gradient
            for j, w in enumerate(idx):
                fishers[i].put(w, g[j:j + 1].pow(2))

    was = [p.requires_grad for p in adapter.model.parameters()]
    adapter.model.requires_grad_(False)  # ∂L/∂x only: no weight gradient is formed
    try:
        blockwise_backward(adapter, states, ids, inputs, weights, _NoWeightGradients(), new_cache,  # type: ignore[arg-type]
                           progress=progress, on_gradient=keep)
    finally:
        for p, flag in zip(adapter.model.parameters(), was, strict=True):
            p.requires_grad_(flag)
        for s in states:
            if s is not None:
                s.clear()
    return fishers
