"""One evaluation result as a line of text, used by the CLI summary, report.md and the model card."""

from __future__ import annotations

from typing import Any

from prunelab.stages.evaluation.zeroshot import describe_task


def describe_result(r: dict[str, Any]) -> str:
    """One evaluation result in a line: perplexity, a zero-shot task or speed, with its protocol."""
    if "ppl" in r:
        return f"PPL {r['ppl']:.3f}  (seq_len {r['seq_len']}, {r['tokens']} tokens)"
    if "lm_eval_version" in r:  # a zero-shot task: whichever metrics it reported (BoolQ: acc only)
        return describe_task(r)
    if "decode_tok_s" in r:
        dec = ", ".join(f"bs {b}: {v} tok/s" for b, v in r["decode_tok_s"].items())
        return f"decode {dec}; prefill bs 1 {r['prefill_ms'].get('1')} ms; peak {r['peak_memory_mb']} MB"
    return str(r)
