"""Stage: write the final dense model — safetensors, tokenizer, model card — and prove it reloads.

The folder is written under a temporary name and renamed into place, so a killed export never
leaves a ``model/`` that looks complete. After writing, a fresh ``AutoModelForCausalLM`` (no
``trust_remote_code``) is loaded from it and its logits are compared with the in-memory model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.registry import register_stage
from stages.core.config import StrictModel

if TYPE_CHECKING:
    from pipeline.context import RunContext


class ExportConfig(StrictModel):
    type: Literal["export"]
    dtype: Literal["same", "float32", "bfloat16", "float16"] = Field("same", description="dtype of the saved weights")
    verify: bool = Field(True, description="reload with vanilla transformers and compare logits")
    tolerance: float = Field(1e-5, gt=0, description="max |Δlogit| allowed by the reload check (float32)")


def model_card(ctx: RunContext) -> str:
    """README.md for the exported model: what was removed, how, and the metrics so far."""
    info, plan = ctx.model_info, ctx.plan
    lines = [
        "---", "library_name: transformers", "tags: [prunelab, pruned, structured-pruning]", "---", "",
        f"# {ctx.recipe.name}", "",
        f"Pruned with prunelab (see the README.md of the prunelab repository) from `{info.get('source')}`.", "",
        "| | before | after |", "|---|---|---|",
        f"| parameters | {info.get('params_before', 0):,} | {info.get('params_after', info.get('params_before', 0)):,} |",
        f"| decoder blocks | {info.get('layers_before')} | {info.get('layers_after', info.get('layers_before'))} |", "",
    ]
    if plan is not None:  # the typed plan describes itself (stages.surgery.plan), as in report.md and the CLI summary
        lines += [plan.describe(), ""] + ([*plan.details(), ""] if plan.details() else [])
    if ctx.evals:
        from stages.evaluation.describe import describe_result

        lines += ["## Evaluation", "", "| model | what | result | protocol |", "|---|---|---|---|"]
        for label, results in ctx.evals.items():
            for name, r in results.items():
                lines.append(f"| {label} | {name} | {describe_result(r)} | {r['protocol']} |")
        lines.append("")
    if getattr(ctx.model.config, "prunelab_layer_shapes", None):
        lines += [("Layer widths differ (adaptive width pruning): load with `from stages.io.loader import load_pruned; "
                   "model = load_pruned(path)` (the prunelab repository, installed with `pip install -e .`); "
                   "plain transformers cannot build per-layer widths yet."), ""]
    else:
        lines += ["Loads with plain `transformers`: `AutoModelForCausalLM.from_pretrained(path)` (no remote code).", ""]
    return "\n".join(lines)


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
    return dict(ctx.exported)


def restore(ctx: RunContext, cfg: ExportConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    if not (ctx.run_dir / "model" / "config.json").is_file():
        raise FileNotFoundError("export was marked done but model/ is missing; re-run with --force")


register_stage("export", ExportConfig, run, restore)
