"""The model that trains and what comes out of it: a LoRA copy or an NF4 (QLoRA) reload of the base, or (method
``full``) a plain copy whose every weight trains; the trained tensors gathered from every shard, and the merge
back into the caller's FULL-precision weights (for ``full``: the trained weights copied into them).

Merging always goes through peft onto the caller's full-precision model: for QLoRA that is the
unquantized pruned weights, never the dequantized NF4 ones.
"""

from __future__ import annotations

import copy
import importlib.util
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from prunelab.stages.arch import adapter_for
from prunelab.stages.core.files import atomic_dir
from prunelab.stages.io.models import resolve_dtype
from prunelab.stages.recovery.config import LoraSettings, RecoverySettings


def lora_config(lora: LoraSettings, model: torch.nn.Module) -> Any:
    """peft's LoraConfig; target names go through the model's adapter, so a fused family (Phi-3's ``qkv_proj``,
    ``gate_up_proj``) gets its own module names for the Llama-layout names a recipe lists."""
    targets = adapter_for(model).lora_modules(list(lora.target_modules))
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def trainable_model(base: torch.nn.Module, cfg: RecoverySettings, work_dir: Path | None, device: torch.device) -> torch.nn.Module:
    """A peft model to train. LoRA: a copy of ``base`` (the caller's weights stay untouched for the
    merge). QLoRA: ``base`` saved once and re-loaded with its linears in NF4 (bitsandbytes)."""
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.method == "full":
        model = copy.deepcopy(base).to(device=device, dtype=dtype).requires_grad_(True)
        model.config.use_cache = False
        if cfg.loop.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    if cfg.method == "lora":
        model = copy.deepcopy(base).to(device=device, dtype=dtype)
    else:
        if work_dir is None:
            raise ValueError("QLoRA needs a folder for the full-precision copy it quantizes")
        model = load_nf4(base, work_dir / "base-fp", dtype, device)
    model.config.use_cache = False
    if cfg.loop.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(cfg.lora, model))


def load_nf4(base: torch.nn.Module, folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """``base`` written once to ``folder`` (full precision) and read back with its linears in NF4."""
    if importlib.util.find_spec("bitsandbytes") is None:  # an extra: the base install has no NF4
        raise ImportError("recovery method qlora needs bitsandbytes, which is not installed: pip install 'prunelab[qlora]' "
                          "(or use method: lora)")
    if not (folder / "config.json").is_file():
        with atomic_dir(folder) as tmp:
            base.save_pretrained(tmp)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # = model dtype: needed for ZeRO-3 to shard the packed NF4 weights (peft's guide)
    )
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype, device_map={"": device})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def trained_folder(method: str) -> str:
    """Where a training's result is saved in its folder: the adapter, or (``full``) every trained weight."""
    return "weights" if method == "full" else "adapter"


def apply_trained(base: torch.nn.Module, folder: Path, method: str) -> torch.nn.Module:
    """The trained model on ``base``'s full-precision weights: the adapter merged, or (``full``) loaded."""
    return load_full(base, folder) if method == "full" else merge_adapter(base, folder)


def load_full(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``full``: the trained weights copied into ``base`` (its dtype and per-layer shapes); nothing to merge."""
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise FileNotFoundError(f"no trained weights in {folder}")
    missing, unexpected = base.load_state_dict(state, strict=False)
    tied = {n for n, _ in base.named_parameters(remove_duplicate=False)} - {n for n, _ in base.named_parameters()}
    untrained = [m for m in missing if m not in tied and m in dict(base.named_parameters())]
    if unexpected or untrained:
        raise ValueError(f"{folder}: weights do not fit the model (unexpected {unexpected[:3]}, missing {untrained[:3]})")
    base.eval()
    return base


def merge_adapter(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Fold the saved adapter into ``base`` (full precision) with peft and return a plain model."""
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.eval()
    return merged


def trainable_only(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict restricted to trainable tensors (what a checkpoint holds)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def rank_fingerprints(acc: Any, model: Any) -> list[list[float]]:
    """Each rank's adapter as (Σw, Σ|w|, Σw²) in float64, gathered: DDP/ZeRO replicas must agree.
    (Under ZeRO-3 a rank holds a shard, so its numbers describe its shard, not the whole adapter.)"""
    named = [p for _, p in acc.unwrap_model(model).named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().double().flatten() for p in named]) if named else torch.zeros(1, dtype=torch.float64)
    local = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()]).to(acc.device)
    return acc.gather(local.reshape(1, 3)).tolist()


def save_adapter(acc: Any, model: Any, adapter_dir: Path) -> None:
    """Adapter weights (method ``full``: every weight) gathered from every shard, written by the main process only.

    Only the trainable tensors are gathered (``GatheredParameters`` under ZeRO-3), so this needs no
    ``stage3_gather_16bit_weights_on_model_save`` and never materialises the frozen base twice.
    """
    unwrapped = acc.unwrap_model(model)
    named = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    gather = nullcontext()
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3 partitioned parameters
        import deepspeed  # lazy: optional

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        state = {n: p.detach().to("cpu", copy=True) for n, p in named}
    if acc.is_main_process:
        with atomic_dir(adapter_dir) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state)
    acc.wait_for_everyone()
