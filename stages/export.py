"""Stage: write the final dense model — safetensors, tokenizer, model card — and prove it reloads.

Formats (``formats``): ``hf`` → ``model/`` (transformers), ``gguf`` → ``model.gguf`` (llama.cpp; per-layer widths
and removed sublayers as ``deci``, stages.io.gguf_export), ``vllm`` → ``model-vllm/`` (DeciLM layout,
stages.io.export_vllm). Each is written under a temporary name and renamed into place, so a killed export never
leaves one that looks complete. With ``verify``: a fresh ``AutoModelForCausalLM`` (no ``trust_remote_code``) is
loaded from ``model/`` and its logits compared with the in-memory model; the GGUF is run by llama.cpp
(llama-cpp-python) on the same windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from prunelab.registry import register_stage
from prunelab.stages.core.config import StrictModel
from prunelab.stages.io.hub import PushToHubConfig

if TYPE_CHECKING:
    from prunelab.context import RunContext

class GGUFExportConfig(StrictModel):
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = Field("f16", description="tensor type of the GGUF's matrices "
                                                        "(norms and biases stay f32; q8_0 rows not a multiple of 32 "
                                                        "fall back to f16, as llama-quantize does)")
    tolerance: float = Field(1e-2, gt=0, description="f32 only: max |Δlogit| llama.cpp vs transformers in the check")
    min_argmax_agreement: float = Field(0.99, ge=0, le=1, description="f32 only: share of positions whose "
                                        "next-token argmax must agree in the check")
    threads: int = Field(2, ge=1, description="llama.cpp threads for the check")


class ExportConfig(StrictModel):
    type: Literal["export"]
    formats: list[Literal["hf", "gguf", "vllm"]] = Field(["hf"], min_length=1, description="what to write: hf → "
                                                         "model/, gguf → model.gguf (llama.cpp), vllm → model-vllm/")
    gguf: GGUFExportConfig = Field(default_factory=GGUFExportConfig, description="GGUF settings (formats: [gguf])")
    dtype: Literal["same", "float32", "bfloat16", "float16"] = Field("same", description="dtype of the saved weights")
    verify: bool = Field(True, description="reload with vanilla transformers and compare logits")
    tolerance: float = Field(1e-5, gt=0, description="max |Δlogit| allowed by the reload check (float32)")
    # added later: left out of dumps when unused
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"push_to_hub": None, "formats": ["hf"], "gguf": GGUFExportConfig()}
    push_to_hub: PushToHubConfig | None = Field(None, description="{repo_id: user/name, private: true}: publish model/ "
                                                "to the Hugging Face Hub in one commit after it is written and verified")

    @model_validator(mode="after")
    def _formats(self) -> ExportConfig:
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats: {self.formats} names a format twice; list each once")
        if self.push_to_hub is not None and "hf" not in self.formats:
            raise ValueError("push_to_hub publishes model/, which formats without 'hf' does not write; add hf to formats")
        return self


def model_card(ctx: RunContext) -> str:
    """README.md for the exported model (``prunelab.stages.io.card``: Hub front matter, plan, metrics)."""
    from prunelab.stages.io.card import model_card as card

    return card(ctx)


def run(ctx: RunContext, cfg: ExportConfig) -> dict[str, Any]:
    from huggingface_hub import ModelCard

    from prunelab.stages.core.files import atomic_dir
    from prunelab.stages.io.formats import export_gguf, export_vllm, refusals, verify_reload
    from prunelab.stages.io.models import DTYPES

    target = ctx.run_dir / "model"
    model = ctx.model
    diff = None
    ctx.exported = {"path": str(target), "reload_max_abs_diff": None} if "hf" in cfg.formats else {}
    if ctx.is_main:
        refused = refusals(cfg, model)
        if refused:  # before anything is written: no half-done export
            raise ValueError("; ".join(refused))
        if cfg.dtype != "same":
            model = model.to(DTYPES[cfg.dtype])
        if "hf" in cfg.formats:
            with atomic_dir(target) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                ctx.tokenizer.save_pretrained(tmp)
                ModelCard(model_card(ctx)).save(tmp / "README.md")
                if cfg.verify:
                    diff = verify_reload(model, tmp, cfg.tolerance if cfg.dtype in ("same", "float32") else 1e-1)
            ctx.exported.update({"path": str(target), "reload_max_abs_diff": diff})
        if "gguf" in cfg.formats:
            ctx.exported["gguf"] = export_gguf(ctx, cfg, model)
        if "vllm" in cfg.formats:
            ctx.exported["vllm"] = export_vllm(ctx, cfg, model)
    if cfg.push_to_hub is not None and ctx.is_main:
        from prunelab.stages.io.hub import push_folder

        ctx.exported["hub"] = push_folder(target, cfg.push_to_hub, f"prunelab: {ctx.recipe.name}")
    return dict(ctx.exported)


def restore(ctx: RunContext, cfg: ExportConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    wanted = {"hf": ctx.run_dir / "model" / "config.json", "gguf": ctx.run_dir / "model.gguf",
              "vllm": ctx.run_dir / "model-vllm" / "config.json"}
    for fmt in cfg.formats:
        if not wanted[fmt].is_file():
            raise FileNotFoundError(f"export was marked done but {wanted[fmt].relative_to(ctx.run_dir)} is missing; "
                                    f"re-run with --force")


register_stage("export", ExportConfig, run, restore)
