"""The exactness check every unit kind of every family passes (test_arch, test_moe): removed == masked, and a
vanilla ``from_pretrained`` of the pruned model gives the same logits again."""

from __future__ import annotations

from pathlib import Path

import torch


def assert_masked_and_reload_equal(model: torch.nn.Module, masked: torch.nn.Module, calib: torch.Tensor, tmp_path: Path,
                                   tol: float = 1e-5) -> None:
    """The pruned model's logits equal the masked model's (max |Δ| ≤ tol, float32), and so do a reload's."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = model(calib).logits
        assert (masked(calib).logits - out).abs().max().item() <= tol
        assert (fresh(calib).logits - out).abs().max().item() <= tol
