"""The block-wise backward: Taylor importance with one block resident (issue 28 item 2).

The ``full`` pipeline's gradient is one forward+backward of the calibration loss per batch through the whole model
(``accumulate_gradients``): every block's weights and activations alive at once. Back-propagation is a chain over
the block boundaries, so it can run block by block instead, from stored boundary states:

1. the sequential forward keeps the boundary states of every batch at the checkpoints x_0, x_k, x_2k, … and x_L
   (``BoundaryCache``: in memory up to the budget, memory-mapped files past it; ``checkpoint_every`` = k, default
   ⌈√L⌉; k = 1 keeps them all);
2. the final norm and head resident: the full pipeline's loss on x_L (transformers' own ``loss_function`` on the
   adapter's logits: mean next-token cross-entropy of the batch) → ∂L/∂x_L per batch;
3. for i = L-1 … 0: when x_i was not kept, the segment above its checkpoint x_s is recomputed first (blocks s … i-1
   run forward again from x_s, one resident at a time, x_{s+1} … x_i stored until the walk passes them); block i
   materialized, recomputed from its stored x_i with grad, ``autograd.backward(x_{i+1}, ∂L/∂x_{i+1})``; its weight
   gradients are folded into the gradient observer's sums per batch (Σ g, and Σ g² with ``fisher`` — the square of
   each batch's gradient, as in ``full``), ∂L/∂x_i kept for the next step, the graph and the block freed;
4. ``hidden`` only: the embedding's gradient from ∂L/∂x_0 (a tied head's share recomputed from x_L beside it, so each
   batch's gradient of the shared matrix is the sum of both, as autograd forms it in ``full``); the final norm's and
   an untied head's at step 2.

Memory: one block's weights + its activations for one batch's backward + the boundary states (⌈L/k⌉ + 1 checkpoints
and up to k − 1 recomputed states of one segment, up to the budget, then disk; k = 1: all L + 1) + two boundaries of
gradients; the head's logits of one batch at step 2. Cost: about one extra block forward per block and batch (the
recomputation with grad) on top of the backward itself, i.e. the same arithmetic as ``full`` plus one forward; with
k > 1 one more forward of the blocks inside each segment (≈ (k−1)/k of a forward; streamed, those blocks are read
from disk once more).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from prunelab.stages.arch.base import ArchAdapter, BlockInputs
from prunelab.stages.calibration.blocks import run_over_batches

if TYPE_CHECKING:
    from prunelab.stages.calibration.observers import GradientObserver
    from prunelab.stages.calibration.sequential import BlockWeights, BoundaryCache


def head_loss(adapter: ArchAdapter, x_last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The calibration loss of the full pipeline's gradient pass on the last boundary state: final norm, the
    adapter's logits (logit scaling / soft-capping included) and the model's own ``loss_function`` (labels = the
    ids, shifted inside: the mean over the batch's B·(T-1) predicted tokens)."""
    model = adapter.model
    if getattr(model.config, "output_router_logits", False):
        raise ValueError(f"{model.config.model_type}: config.output_router_logits adds the routers' load-balancing "
                         "loss to the calibration loss, which the block-wise backward does not form; set it to False "
                         "or use pipeline: full")
    logits = adapter.logits(adapter.final_norm(x_last))
    return model.loss_function(logits=logits, labels=ids.to(logits.device), vocab_size=model.config.vocab_size)


def checkpoint_interval(setting: int | None, num_blocks: int) -> int:
    """k of ``checkpoint_every``: the setting, or ⌈√L⌉ — the forward keeps ⌈L/k⌉ + 1 boundaries and the backward
    adds at most k − 1 recomputed ones, a sum smallest near k = √L."""
    return setting if setting is not None else max(1, math.ceil(math.sqrt(num_blocks)))


def is_checkpoint(index: int, every: int) -> bool:
    """Whether the forward keeps boundary x_index for the backward (x_L is always kept: the head's loss reads it)."""
    return index % every == 0


def blockwise_backward(adapter: ArchAdapter, states: list[BoundaryCache | None], ids: list[torch.Tensor],
                       inputs: Callable[[torch.Tensor], BlockInputs], weights: BlockWeights,
                       observer: GradientObserver, new_cache: Callable[[str], BoundaryCache],
                       progress: bool = True,
                       on_gradient: Callable[[int, BoundaryCache], None] | None = None) -> None:
    """Steps 2–4 of the module docstring. ``states[i]``: every batch's x_i, or None where the forward kept no
    checkpoint (recomputed from the one below; x_0 and x_L are always given); each is cleared once read for the last
    time. ``inputs(x)``: the block inputs of a state's shape; ``new_cache(tag)``: an empty cache for one boundary of
    gradients or of recomputed states. ``on_gradient(i, grads)``: called with ∂L/∂x_{i+1} of every batch (the
    gradient at block i's OUTPUT) before that boundary's gradients are freed (block-local reconstruction's Fisher
    weights read them)."""
    if states[0] is None or states[-1] is None:
        raise ValueError("the block-wise backward needs the boundary states x_0 and x_L")
    model, n = adapter.model, adapter.num_blocks
    hidden = observer.every_parameter
    embed_w, head_w = f"{adapter.EMBED}.weight", f"{adapter.HEAD}.weight"
    # one matrix: the full model names it once (the embedding's); a streamed skeleton whose tie an earlier load broke
    # still reads its head from the embedding's tensors (SafetensorsWeights.head)
    tied = head_w not in observer.names or (bool(getattr(model.config, "tie_word_embeddings", False))
                                            and head_w not in getattr(weights, "where", {head_w: None}))
    reached = tuple(f"{path}." for path in (adapter.EMBED, adapter.NORM, adapter.HEAD))
    other = [nm for nm in observer.names if not adapter.is_block_param(nm) and not nm.startswith(reached)]
    if hidden and other:
        raise ValueError(f"hidden channels: parameters {other[:3]} sit outside the blocks, the embedding, the final "
                         "norm and the head, where the block-wise backward does not reach; use pipeline: full")
    grads = new_cache(f"g{n}")
    last = states[n]
    assert last is not None
    with weights.head(adapter):
        top = [(nm, p) for nm, p in _outside_blocks(adapter) if hidden and not tied and p.requires_grad]
        for b, batch in enumerate(ids):
            x = last.get(b).detach().requires_grad_()
            with torch.enable_grad():
                loss = head_loss(adapter, x, batch)
                (gx, *gp) = torch.autograd.grad(loss, [x] + [p for _, p in top], allow_unused=True)
            for (_, p), g in zip(top, gp, strict=True):
                p.grad = g
            observer.fold(top)
            grads.put(b, gx)
    if not (hidden and tied):  # x_L is read again below for a tied head's share of the embedding gradient
        last.clear()
    for i in tqdm(reversed(range(n)), total=n, desc="block-wise backward", disable=not progress):
        if states[i] is None:
            _recompute(adapter, states, i, len(ids), inputs, weights, new_cache)
        state = states[i]
        assert state is not None
        below = new_cache(f"g{i}")
        with weights.block(adapter, i):
            layer = adapter.layers[i]
            prefix = adapter.block_prefix(i)
            named = [(f"{prefix}.{nm}", p) for nm, p in layer.named_parameters()]
            layer.zero_grad(set_to_none=True)
            for b in range(len(ids)):
                x = state.get(b).detach().requires_grad_()
                with torch.enable_grad():
                    out = adapter.run_block(i, x, inputs(x))
                    torch.autograd.backward(out, grads.get(b))
                del out  # the block's graph goes with it: one batch's activations at a time
                observer.fold(named)
                if i > 0 or hidden:
                    below.put(b, x.grad)
        if on_gradient is not None:
            on_gradient(i, grads)
        grads.clear()
        state.clear()
        states[i] = None
        grads = below
    if hidden:
        _embedding_step(adapter, last, grads, ids, weights, observer, tied, embed_w)
        last.clear()
        grads.clear()
    observer.batches_done(len(ids))
    model.zero_grad(set_to_none=True)


def _recompute(adapter: ArchAdapter, states: list[BoundaryCache | None], top: int, batches: int,
               inputs: Callable[[torch.Tensor], BlockInputs], weights: BlockWeights,
               new_cache: Callable[[str], BoundaryCache]) -> None:
    """x_{s+1} … x_top of every batch from the checkpoint x_s below ``top``: blocks s … top-1 run forward again, one
    resident at a time, without grad — the forward's arithmetic on the forward's inputs, so the states are the ones it
    dropped."""
    start = max(j for j in range(top) if states[j] is not None)
    for j in range(start, top):
        source, cache = states[j], new_cache(f"r{j + 1}")
        assert source is not None
        with weights.block(adapter, j), torch.no_grad():
            run_over_batches(adapter, j, source, cache, batches, inputs)
        states[j + 1] = cache


def _outside_blocks(adapter: ArchAdapter) -> list[tuple[str, torch.nn.Parameter]]:
    """The final norm's and the head's parameters under the full model's names (what is resident at step 2)."""
    out = []
    for path in (adapter.NORM, adapter.HEAD):
        out += [(f"{path}.{nm}", p) for nm, p in adapter.model.get_submodule(path).named_parameters()]
    return out


def _embedding_step(adapter: ArchAdapter, last: BoundaryCache, grads: BoundaryCache, ids: list[torch.Tensor],
                    weights: BlockWeights, observer: GradientObserver, tied: bool, embed_w: str) -> None:
    """The embedding's gradient of each batch from ∂L/∂x_0; with a tied head, the head's share (and the final norm's
    gradient) recomputed from x_L in the same batch, added into the one matrix's gradient before it is folded."""
    with ExitStack() as stack:
        stack.enter_context(weights.embedding(adapter))
        if tied:
            stack.enter_context(weights.head(adapter))
        embedding, head = adapter.embedding.weight, adapter.head.weight
        named: list[tuple[str, Any]] = [(embed_w, embedding)]
        if tied:
            named += [(nm, p) for nm, p in _outside_blocks(adapter) if nm != f"{adapter.HEAD}.weight"]
        adapter.model.zero_grad(set_to_none=True)
        for b, batch in enumerate(ids):
            with torch.enable_grad():
                if tied:  # the head's share first, as autograd accumulates it in the full backward
                    head_loss(adapter, last.get(b).detach(), batch).backward()
                    if head is not embedding and head.grad is not None:  # streamed: two copies of one matrix
                        embedding.grad, head.grad = head.grad, None
                x0 = adapter.embed(batch)
                torch.autograd.backward(x0, grads.get(b))
            observer.fold(named)


def fold_gradients(named: Iterable[tuple[str, torch.nn.Parameter]], sums: dict[str, torch.Tensor],
                   squares: dict[str, torch.Tensor] | None) -> None:
    """One batch's gradients added to the float32 sums (and squared sums), then cleared — ``accumulate_gradients``'s
    arithmetic, parameter by parameter."""
    for name, p in named:
        if p.grad is None:
            continue
        g = p.grad.detach().float()
        sums[name] = sums[name] + g if name in sums else g.clone()
        if squares is not None:
            sq = g * g
            squares[name] = squares[name] + sq if name in squares else sq
        p.grad = None
