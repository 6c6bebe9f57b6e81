"""The exactness check every unit kind of every family passes (test_arch, test_moe): removed == masked, and a
vanilla ``from_pretrained`` of the pruned model gives the same logits again; and a LoRA step on a pruned model merges
into weights that reload the same."""

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


def assert_lora_step_merges_and_reloads(peft_model: torch.nn.Module, calib: torch.Tensor, tmp_path: Path,
                                        tol: float = 1e-5) -> None:
    """One training step of ``peft_model`` on ``calib``, merged: finite logits, equal (max |Δ| ≤ tol) after a vanilla
    ``from_pretrained`` of the merged model."""
    from transformers import AutoModelForCausalLM

    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    peft_model(input_ids=calib, labels=calib).loss.backward()
    opt.step()
    merged = peft_model.merge_and_unload().eval()
    merged.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = merged(calib).logits
        assert torch.isfinite(out).all()
        assert (fresh(calib).logits - out).abs().max().item() <= tol
