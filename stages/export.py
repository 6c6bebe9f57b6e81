"""Stage: write the final dense model — safetensors, tokenizer, model card — and prove it reloads.

The folder is written under a temporary name and renamed into place, so a killed export never
leaves a ``model/`` that looks complete. After writing, a fresh ``AutoModelForCausalLM`` (no
``trust_remote_code``) is loaded from it and its logits are compared with the in-memory model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from pipeline.registry import register_stage
from stages.core.config import StrictModel
from stages.io.hub import PushToHubConfig

if TYPE_CHECKING:
    from pipeline.context import RunContext


class ExportConfig(StrictModel):
    type: Literal["export"]
    dtype: Literal["same", "float32", "bfloat16", "float16"] = Field("same", description="dtype of the saved weights")
    verify: bool = Field(True, description="reload with vanilla transformers and compare logits")
    tolerance: float = Field(1e-5, gt=0, description="max |Δlogit| allowed by the reload check (float32)")
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"push_to_hub": None}  # added later: left out of dumps when unused
    push_to_hub: PushToHubConfig | None = Field(None, description="{repo_id: user/name, private: true}: publish model/ "
                                                "to the Hugging Face Hub in one commit after it is written and verified")


def model_card(ctx: RunContext) -> str:
    """README.md for the exported model (``stages.io.card``: Hub front matter, plan, metrics)."""
    from stages.io.card import model_card as card

    return card(ctx)


def verify_reload(model: Any, path: Path, tolerance: float) -> float:
    """Max |Δlogit| between ``model`` and a fresh vanilla load of ``path``; raise above ``tolerance``."""
    import torch

    from stages.io.loader import load_pruned

    fresh = load_pruned(path, dtype=next(model.parameters()).dtype, device=model.device)
    ids = torch.arange(3, 3 + 24, device=model.device).unsqueeze(0) % model.config.vocab_size
    with torch.inference_mode():
        diff = (fresh(ids).logits.float() - model(ids).logits.float()).abs().max().item()
    if diff > tolerance:
        raise RuntimeError(f"exported model at {path} gives logits differing by {diff:.2e} > {tolerance:.0e}")
    return diff


def run(ctx: RunContext, cfg: ExportConfig) -> dict[str, Any]:
    from huggingface_hub import ModelCard

    from stages.core.files import atomic_dir
    from stages.io.models import DTYPES

    target = ctx.run_dir / "model"
    model = ctx.model
    if ctx.is_main:
        with atomic_dir(target) as tmp:
            if cfg.dtype != "same":
                model = model.to(DTYPES[cfg.dtype])
            model.save_pretrained(tmp, safe_serialization=True)
            ctx.tokenizer.save_pretrained(tmp)
            ModelCard(model_card(ctx)).save(tmp / "README.md")
            if cfg.verify:
                diff = verify_reload(model, tmp, cfg.tolerance if cfg.dtype in ("same", "float32") else 1e-1)
    ctx.exported = {"path": str(target), "reload_max_abs_diff": diff if ctx.is_main and cfg.verify else None}
    if cfg.push_to_hub is not None and ctx.is_main:
        from stages.io.hub import push_folder

        ctx.exported["hub"] = push_folder(target, cfg.push_to_hub, f"prunelab: {ctx.recipe.name}")
    return dict(ctx.exported)


def restore(ctx: RunContext, cfg: ExportConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    if not (ctx.run_dir / "model" / "config.json").is_file():
        raise FileNotFoundError("export was marked done but model/ is missing; re-run with --force")


register_stage("export", ExportConfig, run, restore)
