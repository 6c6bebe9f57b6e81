"""Block-level passes shared by the observers and the criteria: calibration batches, and the calibration NLL with
each block removed.

``removal_nll``: the hidden state entering block i is the dense x_i, so candidate i only runs blocks i+1…L-1 and
the head: about half the block evaluations of "one full forward per candidate" (the naive reference is kept for
the benchmark). The boundary statistics themselves live in ``prunelab.stages.calibration.observers``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from prunelab.stages.arch.base import ArchAdapter


def batches(calibration: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, calibration.shape[0], batch_size):
        yield calibration[start : start + batch_size]


def run_over_batches(adapter: ArchAdapter, index: int, source: Any, target: Any, count: int,
                     inputs: Any) -> None:
    """Block ``index`` (resident) on every batch's state ``source.get(b)``, its output ``target.put(b, …)``: one
    boundary of a sequential walk to the next (``source`` / ``target``: boundary caches; ``inputs(x)``: the block
    inputs of a state's shape)."""
    for b in range(count):
        x = source.get(b)
        target.put(b, adapter.run_block(index, x, inputs(x)))


@torch.inference_mode()
def removal_nll_batch(
    adapter: ArchAdapter, states: list[torch.Tensor], kept: list[int], ids: torch.Tensor, max_stack: int = 64
) -> list[float]:
    """NLL sum of this batch with each kept block removed in turn, re-using the cached boundary states.

    ``states[p]`` is the hidden state entering kept block ``kept[p]``; removing that block means
    feeding it straight into ``kept[p+1]``, so only the blocks after the removed one are run.
    The candidates advance as a wavefront: at block ``kept[q]`` every candidate p < q that is
    still running is stacked along the batch axis and the block runs once — the same arithmetic
    as one candidate at a time, in a few large matrix products instead of ~n²/2 small ones.
    """
    inputs = adapter.prepare(states[0])
    running: list[torch.Tensor] = []  # hidden of candidate p (p = position in ``kept``), in order
    for q, block in enumerate(kept):
        running = advance(adapter, block, running, inputs, max_stack)
        running.append(states[q])  # candidate q skips block q: its input goes on to the next block
    return candidates_nll(adapter, running, ids)


def advance(adapter: ArchAdapter, block: int, running: list[torch.Tensor], inputs: Any,
            max_stack: int = 64) -> list[torch.Tensor]:
    """Every running candidate's state through ``block``, stacked along the batch axis (``max_stack`` at a time)."""
    if not running:
        return running
    batch = running[0].shape[0]
    out = torch.cat([adapter.run_block(block, part, _repeat(inputs, part.shape[0] // batch))
                     for part in torch.cat(running).split(max_stack * batch)])
    return list(out.split(batch))


def candidates_nll(adapter: ArchAdapter, finals: list[torch.Tensor], ids: torch.Tensor) -> list[float]:
    """The summed NLL of the batch ``ids`` for each candidate's final state (final norm and head applied)."""
    stacked = torch.cat(finals)
    per_seq = adapter.nll_per_sequence(stacked, ids.repeat(len(finals), 1).to(stacked.device))
    return per_seq.view(len(finals), ids.shape[0]).sum(-1).tolist()


def _repeat(inputs: Any, times: int) -> Any:
    """Block inputs for ``times`` stacked copies of the batch (masks broadcast; rotary is per position)."""
    if times == 1:
        return inputs
    masks = {k: (m.repeat(times, *([1] * (m.dim() - 1))) if isinstance(m, torch.Tensor) and m.shape[0] > 1 else m)
             for k, m in inputs.masks.items()}
    return type(inputs)(masks, inputs.position_embeddings, inputs.position_ids)


@torch.inference_mode()
def naive_removal_nll(adapter: ArchAdapter, calibration: torch.Tensor, kept: list[int], batch_size: int) -> list[float]:
    """Reference: one full Hugging Face forward per candidate, as the Shortened LLaMA code does.

    The model's block list is swapped for the candidate's for the duration of the forward (no
    copy of the weights); the loss is transformers' own. What the cached version must equal and beat.
    """
    model = adapter.model
    original, n_layers = adapter.layers, model.config.num_hidden_layers
    totals = [0.0] * len(kept)
    try:
        for ids in batches(calibration, batch_size):
            ids = ids.to(adapter.device)
            for p, block in enumerate(kept):
                adapter.set_layers([original[i] for i in kept if i != block])
                model.config.num_hidden_layers = adapter.num_blocks
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                totals[p] += loss.item() * ids[:, 1:].numel()
    finally:
        adapter.set_layers(original)
        model.config.num_hidden_layers = n_layers
    return totals
