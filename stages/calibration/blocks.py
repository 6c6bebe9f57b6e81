"""Block-boundary observers: per calibration batch, the hidden state at every block boundary, computed once.

From x_0 … x_L (held for that batch only) we update whatever the requested criteria declared they need:

- ``boundary``: Σ_t cos(x_i,t, x_{i+1},t) for consecutive boundaries (ShortGPT BI) and, for every
  pair (ℓ, ℓ+n), Σ_samples arccos(cos(x_ℓ,T, x_ℓ+n,T))/π at the last token T (Gromov et al.).
- ``sublayers``: Σ_t cos(X, Y) for each attention and MLP sublayer, X the residual stream entering it and Y the one
  leaving it (the layer's input, the residual between its sublayers — read by a pre-hook on the adapter's
  ``MID_RESIDUAL`` module during the same block pass — and the layer's output);
- ``removal_nll``: calibration NLL with each block removed. The hidden state entering block i is
  the dense x_i, so candidate i only runs blocks i+1…L-1 and the head: about half the block
  evaluations of "one full forward per candidate" (the naive reference is kept for the benchmark).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from prunelab.stages.arch.base import ArchAdapter

if TYPE_CHECKING:
    from prunelab.stages.calibration.stats import CalibrationStats

OBSERVED = frozenset({"boundary", "sublayers", "removal_nll"})


def batches(calibration: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, calibration.shape[0], batch_size):
        yield calibration[start : start + batch_size]


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
    batch = ids.shape[0]
    inputs = adapter.prepare(states[0])
    running: list[torch.Tensor] = []  # hidden of candidate p (p = position in ``kept``), in order
    for q, block in enumerate(kept):
        if running:
            stacked = torch.cat(running)
            out = torch.cat([adapter.run_block(block, part, _repeat(inputs, part.shape[0] // batch))
                             for part in stacked.split(max_stack * batch)])
            running = list(out.split(batch))
        running.append(states[q])  # candidate q skips block q: its input goes on to the next block
    finals = torch.cat(running)
    per_seq = adapter.nll_per_sequence(finals, ids.repeat(len(kept), 1).to(finals.device))
    return per_seq.view(len(kept), batch).sum(-1).tolist()


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


def _update_boundary(stats: CalibrationStats, states: list[torch.Tensor]) -> None:
    normed = [torch.nn.functional.normalize(s.float(), dim=-1) for s in states]
    cos_next = torch.stack([(a * b).sum(-1).sum() for a, b in itertools.pairwise(normed)])
    stats.bi_cos_sum += cos_next.cpu().double()
    stats.bi_tokens += normed[0].shape[0] * normed[0].shape[1]
    last = torch.stack([s[:, -1] for s in normed])  # [L+1, B, H]
    cos = torch.einsum("abh,cbh->acb", last, last).clamp(-1.0, 1.0)  # [L+1, L+1, B]
    stats.angular_sum += (torch.arccos(cos) / math.pi).sum(-1).cpu().double()
    stats.angular_samples += last.shape[1]


def _update_sublayers(stats: CalibrationStats, states: list[torch.Tensor], mids: list[torch.Tensor]) -> None:
    if len(mids) != len(states) - 1:
        raise RuntimeError(f"sublayer statistics: {len(mids)} mid-layer residuals for {len(states) - 1} blocks")
    cos = torch.nn.functional.cosine_similarity
    dtype = torch.promote_types(states[0].dtype, torch.float32)  # at least float32 (bf16 models), float64 stays
    for i, mid in enumerate(mids):
        x, m, y = states[i].to(dtype), mid.to(dtype), states[i + 1].to(dtype)
        stats.sublayer_cos_sum[i, 0] += cos(x, m, dim=-1).sum().item()
        stats.sublayer_cos_sum[i, 1] += cos(m, y, dim=-1).sum().item()
    stats.sublayer_tokens += states[0].shape[0] * states[0].shape[1]


def start_block_observers(stats: CalibrationStats, needs: set[str]) -> None:
    n = stats.num_blocks
    if "boundary" in needs:
        stats.bi_cos_sum = torch.zeros(n, dtype=torch.float64)
        stats.angular_sum = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    if "removal_nll" in needs:
        stats.removal_nll = torch.zeros(n, dtype=torch.float64)
    if "sublayers" in needs:
        stats.sublayer_cos_sum = torch.zeros(n, 2, dtype=torch.float64)


@torch.inference_mode()
def observe_blocks(adapter: ArchAdapter, ids: torch.Tensor, stats: CalibrationStats, needs: set[str]) -> None:
    """One batch: the boundary states once, then every requested block statistic from them."""
    if "sublayers" in needs:
        if not adapter.SUBLAYER_REMOVAL:  # e.g. Gemma's post-norms: the MID_RESIDUAL module does not see the stream
            from prunelab.stages.arch import SUBLAYER_FAMILIES

            raise ValueError(f"sublayer statistics (sublayer_cosine): not defined for {adapter.family} "
                             f"({adapter.model.config.model_type}); supported: {', '.join(SUBLAYER_FAMILIES)} — use a "
                             "block criterion such as block_influence")
        mids: list[torch.Tensor] = []
        hooks = [layer.get_submodule(adapter.MID_RESIDUAL).register_forward_pre_hook(
            lambda _m, args, kwargs: mids.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
            for layer in adapter.layers]
        try:
            states = adapter.boundary_states(ids)
        finally:
            for h in hooks:
                h.remove()
        _update_sublayers(stats, states, mids)
    else:
        states = adapter.boundary_states(ids)
    if "boundary" in needs:
        _update_boundary(stats, states)
    if "removal_nll" in needs:
        kept = list(range(stats.num_blocks))
        stats.removal_nll += torch.tensor(removal_nll_batch(adapter, states, kept, ids), dtype=torch.float64)
        dense, count = adapter.nll_sum(states[-1], ids)
        stats.dense_nll += dense
        stats.nll_tokens += count
