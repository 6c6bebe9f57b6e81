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

from pydantic import Field, field_validator, model_validator

from prunelab.registry import register_stage
from prunelab.stages.core.config import StrictModel
from prunelab.stages.io.formats import FORMATS, refusals
from prunelab.stages.io.hub import PushToHubConfig, push_folder
from prunelab.stages.surgery.streamed import export_streamed

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
    embedding_dtype: Literal["f32", "f16", "bf16", "q8_0"] | None = Field(
        None, description="type of token_embd / output (llama-quantize's --token-embedding-type); null: f16 when dtype "
        "is q8_0 (measured: the quantized embedding costs small models ~0.3% PPL more), else dtype")

    LATER_FIELDS: ClassVar[dict[str, Any]] = {"embedding_dtype": None}  # older run directories keep their chain hashes


class ExportConfig(StrictModel):
    type: Literal["export"]
    formats: list[str] = Field(["hf"], min_length=1, description="what to write (stages.io.formats.FORMATS): hf → "
                               "model/, gguf → model.gguf (llama.cpp), vllm → model-vllm/")
    gguf: GGUFExportConfig = Field(default_factory=GGUFExportConfig, description="GGUF settings (formats: [gguf])")
    dtype: Literal["same", "float32", "bfloat16", "float16"] = Field("same", description="dtype of the saved weights")
    verify: bool = Field(True, description="reload with vanilla transformers and compare logits")
    tolerance: float = Field(1e-5, gt=0, description="max |Δlogit| allowed by the reload check (float32)")
    # added later: left out of dumps when unused
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"push_to_hub": None, "formats": ["hf"], "gguf": GGUFExportConfig(),
                                              "shard_mb": None}
    shard_mb: float | None = Field(None, gt=0, description="largest safetensors shard of model/ in MB (none: "
                                   "save_pretrained's default; 2048 for a streamed model)")
    push_to_hub: PushToHubConfig | None = Field(None, description="{repo_id: user/name, private: true}: publish model/ "
                                                "to the Hugging Face Hub in one commit after it is written and verified")

    @field_validator("formats")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        unknown = [f for f in v if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format {unknown[0]!r}; choose from {' | '.join(FORMATS.names())}")
        return v

    @model_validator(mode="after")
    def _formats(self) -> ExportConfig:
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats: {self.formats} names a format twice; list each once")
        if self.push_to_hub is not None and "hf" not in self.formats:
            raise ValueError("push_to_hub publishes model/, which formats without 'hf' does not write; add hf to formats")
        return self


def run(ctx: RunContext, cfg: ExportConfig) -> dict[str, Any]:
    from prunelab.stages.io.models import DTYPES  # lazy: torch-free

    target = ctx.run_dir / "model"
    model = ctx.model
    ctx.exported = {"path": str(target), "reload_max_abs_diff": None} if "hf" in cfg.formats else {}
    if ctx.is_main:
        refused = refusals(cfg, model)
        if refused:  # before anything is written: no half-done export
            raise ValueError("; ".join(refused))
        if getattr(model, "prunelab_weights", None) is not None:  # streamed: block by block (stages.io.streaming)
            ctx.exported = export_streamed(ctx, cfg)
            return dict(ctx.exported)
        if cfg.dtype != "same":
            model = model.to(DTYPES[cfg.dtype])
        for name in [f for f in FORMATS.names() if f in cfg.formats]:  # registration order: hf first, as before
            fmt = FORMATS.get(name)
            out = fmt.write(ctx, cfg, model)
            if fmt.top_level:
                ctx.exported.update(out)
            else:
                ctx.exported[name] = out
    if cfg.push_to_hub is not None and ctx.is_main:
        ctx.exported["hub"] = push_folder(target, cfg.push_to_hub, f"prunelab: {ctx.recipe.name}")
    return dict(ctx.exported)


def restore(ctx: RunContext, cfg: ExportConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    for fmt in cfg.formats:
        wanted = ctx.run_dir / FORMATS.get(fmt).output
        if not wanted.is_file():
            raise FileNotFoundError(f"export was marked done but {wanted.relative_to(ctx.run_dir)} is missing; "
                                    f"re-run with --force")


register_stage("export", ExportConfig, run, restore)
