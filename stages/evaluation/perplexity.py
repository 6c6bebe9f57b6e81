"""Token perplexity, the protocol pruning papers use (not lm-eval's word perplexity).

Text joined and tokenized once; the first ``max_tokens`` tokens cut into non-overlapping windows of
``seq_len``; each window is scored independently; PPL = exp(mean NLL over all predicted tokens),
i.e. ``seq_len − 1`` predictions per window. 128-token and 2048-token windows give numbers that
cannot be compared, so the window is always reported next to the value.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelab.stages.arch import adapter_for


@torch.inference_mode()
def windowed_perplexity(
    model: torch.nn.Module, ids: torch.Tensor, seq_len: int, max_tokens: int | None = None,
    batch_size: int = 1, progress: bool = True, desc: str = "perplexity",
) -> dict[str, Any]:
    """Perplexity of ``model`` on a 1-D token tensor under the windowed protocol above."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"only {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    adapter = adapter_for(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc=desc, disable=not progress):
        batch = windows[start : start + batch_size].to(adapter.device)
        hidden = adapter.final_states(batch)
        total += adapter.nll_per_sequence(hidden, batch, normed=True).sum().item()  # HF output is post-norm
        count += batch[:, 1:].numel()
    return {
        "ppl": math.exp(total / count),
        "nll": total / count,
        "seq_len": seq_len,
        "tokens": n_windows * seq_len,
        "predicted_tokens": count,
        "windows": n_windows,
    }


def protocol(source: str, seq_len: int, tokens: int, windows: int) -> str:
    return (
        f"token perplexity on {source}: text tokenized once, first {tokens} tokens in {windows} non-overlapping "
        f"windows of {seq_len}, mean NLL over the {seq_len - 1} predicted tokens per window"
    )
