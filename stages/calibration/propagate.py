"""Error propagation: walk the blocks with two paths side by side, the dense one and the already-pruned one.

SparseGPT's ``llama_sequential`` and llm-compressor's sequential pipeline with ``propagate_error`` feed block i+1
the outputs of the already-compressed block i, so whatever is fitted on block i+1 (compensation, reconstruction)
sees the inputs the pruned model will really give it. ``walk_pruned`` is that loop, reusable by any per-block fit:

- two boundary caches per block boundary: x_i (the dense model's state entering block i) and x'_i (the state the
  blocks already pruned give it), both starting from the same embeddings;
- for each block i: its weights materialized (``BlockWeights``), a deep copy made (``BlockStep.pruned``), the
  caller's ``fit(step)`` prunes/compensates/trains that copy in place, then every batch runs through the dense
  block (x_{i+1} = f_i(x_i)) and through the copy (x'_{i+1} = f'_i(x'_i)); the copy is dropped, the block freed.

The model's own blocks are never modified: what ``fit`` decides leaves through its own return channel (the
compensation of ``prunelab.stages.surgery.propagated`` returns side tensors that surgery applies afterwards). Peak
memory: one block twice (dense and copy) + four boundary caches (two paths × in/out, ``memory_budget_gb`` split
between them, the rest memory-mapped). Forward passes only; ``fit`` may enable gradients itself.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelab.stages.arch import adapter_for
from prunelab.stages.arch.base import ArchAdapter, BlockInputs
from prunelab.stages.calibration.blocks import batches
from prunelab.stages.calibration.pipelines import SequentialPipeline
from prunelab.stages.calibration.sequential import BlockWeights, BoundaryCache, ResidentWeights


@dataclass
class BlockStep:
    """Block ``index`` while the walk holds it: the dense block, the copy ``fit`` edits, both paths' inputs."""

    index: int
    adapter: ArchAdapter
    dense: torch.nn.Module  # the model's own block (dense weights): never edit it
    pruned: torch.nn.Module  # a deep copy: prune / compensate / train it in place
    num_batches: int
    dense_in: Callable[[int], torch.Tensor]  # batch b's state entering the dense block (x_i)
    pruned_in: Callable[[int], torch.Tensor]  # batch b's state entering the pruned block (x'_i)
    block_inputs: Callable[[torch.Tensor], BlockInputs]

    def run(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module`` (the dense block or the copy) on ``x``, in block ``index``'s place (the family's own call)."""
        with in_place_of(self.adapter, self.index, module):
            return self.adapter.run_block(self.index, x, self.block_inputs(x))

    def pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch, the dense block's output on x_i and the copy's on x'_i (under ``no_grad``), in batch order."""
        for b in range(self.num_batches):
            with torch.no_grad():
                yield self.run(self.dense, self.dense_in(b)), self.run(self.pruned, self.pruned_in(b))

    def paired_inputs(self, member: Callable[[torch.nn.Module], torch.nn.Module]
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch, the input of ``member(block)`` in the dense block on x_i and in the copy on x'_i, token-aligned
        (the cross term needs them paired). Each forward stops at that module: what follows it is not computed."""
        for b in range(self.num_batches):
            got = []
            for module, x in ((self.dense, self.dense_in(b)), (self.pruned, self.pruned_in(b))):
                seen, handle = capture_inputs(member(module), stop=True)
                try:
                    with torch.no_grad():
                        self.run(module, x)
                except _Stop:
                    pass
                finally:
                    handle.remove()
                got.append(seen[0])
            yield got[0], got[1]


@contextmanager
def in_place_of(adapter: ArchAdapter, index: int, module: torch.nn.Module) -> Iterator[None]:
    """``module`` stands in the model's layer list at ``index`` for the duration (the adapters run ``layers[i]``)."""
    layers = adapter.layers
    original = layers[index]
    layers[index] = module
    try:
        yield
    finally:
        layers[index] = original


def walk_pruned(model: torch.nn.Module, calibration: torch.Tensor, fit: Callable[[BlockStep], None],
                batch_size: int = 1, progress: bool = True, settings: SequentialPipeline | None = None,
                weights: BlockWeights | None = None) -> None:
    """Run every block on both paths, block by block, calling ``fit(step)`` on each block before its outputs are
    computed, so block i+1's pruned-path inputs come from the block ``fit`` left (module docstring).

    ``settings``: the sequential pipeline's memory budget and offload folder (its ``propagate`` is not read: this
    function *is* pruned propagation); ``weights``: where the blocks come from (default: the model is resident)."""
    settings = settings or SequentialPipeline()
    weights = weights or getattr(model, "prunelab_weights", None) or ResidentWeights()  # a streamed skeleton's source
    adapter = adapter_for(model)
    folder = Path(settings.offload_dir) if settings.offload_dir else Path(tempfile.mkdtemp(prefix="prunelab-walk-"))
    folder.mkdir(parents=True, exist_ok=True)
    budget = settings.memory_budget_gb * 2**30 / 4  # four caches alive at once: dense/pruned × in/out
    ids_batches = list(batches(calibration, batch_size))
    prepared: dict[tuple[int, ...], BlockInputs] = {}

    def block_inputs(x: torch.Tensor) -> BlockInputs:
        key = tuple(x.shape[:2])
        if key not in prepared:
            prepared[key] = adapter.prepare(x)
        return prepared[key]

    dense, pruned = BoundaryCache(budget, folder, "d0"), BoundaryCache(budget, folder, "p0")
    try:
        with weights.embedding(adapter), torch.no_grad():
            for b, ids in enumerate(ids_batches):
                x = adapter.embed(ids)
                block_inputs(x)
                dense.put(b, x)
                pruned.put(b, x)  # the same embeddings: nothing is pruned yet
        for i in tqdm(range(adapter.num_blocks), desc="pruned propagation", disable=not progress):
            dense_next = BoundaryCache(budget, folder, f"d{i + 1}")
            pruned_next = BoundaryCache(budget, folder, f"p{i + 1}")
            with weights.block(adapter, i):
                layer = adapter.layers[i]
                step = BlockStep(i, adapter, layer, copy.deepcopy(layer), len(ids_batches), dense.get, pruned.get,
                                 block_inputs)
                fit(step)
                if i + 1 < adapter.num_blocks:  # the last block's outputs feed nothing
                    for b, (y, y_pruned) in enumerate(step.pairs()):
                        dense_next.put(b, y)
                        pruned_next.put(b, y_pruned)
                del step
            dense.clear()
            pruned.clear()
            dense, pruned = dense_next, pruned_next
    finally:
        dense.clear()
        pruned.clear()
        if not settings.offload_dir:
            shutil.rmtree(folder, ignore_errors=True)


class _Stop(Exception):
    """Raised by a capturing hook to end a forward at the module it watches."""


def capture_inputs(module: torch.nn.Module, stop: bool = False) -> tuple[list[torch.Tensor], Any]:
    """A list that receives ``module``'s input on every call, and the hook's handle (remove it when done); with
    ``stop`` the forward ends there (``_Stop``, caught by ``BlockStep.paired_inputs``)."""
    seen: list[torch.Tensor] = []

    def hook(_m: Any, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())
        if stop:
            raise _Stop

    return seen, module.register_forward_pre_hook(hook)
