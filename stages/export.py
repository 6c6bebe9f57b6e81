"""Stage: write the final dense model — safetensors, tokenizer, model card — and prove it reloads.

Formats (``formats``): ``hf`` → ``model/`` (transformers), ``gguf`` → ``model.gguf`` (llama.cpp; per-layer widths
and removed sublayers as ``deci``, stages.io.gguf_export), ``vllm`` → ``model-vllm/`` (DeciLM layout,
stages.io.export_vllm). Each is written under a temporary name and renamed into place, so a killed export never
leaves one that looks complete. With ``verify``: a fresh ``AutoModelForCausalLM`` (no ``trust_remote_code``) is
loaded from ``model/`` and its logits compared with the in-memory model; the GGUF is run by llama.cpp
(llama-cpp-python) on the same windows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.registry import register_stage
from stages.core.config import StrictModel
from stages.io.hub import PushToHubConfig

if TYPE_CHECKING:
    from pipeline.context import RunContext

log = logging.getLogger(__name__)


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


def _check_ids(ctx: RunContext, n: int = 2, length: int = 128) -> list[list[int]]:
    """Windows for the GGUF check: the first calibration windows when there are some, else a fixed id ramp."""
    vocab = ctx.model.config.vocab_size
    if ctx.calibration is not None and getattr(ctx.calibration, "ndim", 0) == 2:
        return [[int(t) for t in row[:length]] for row in ctx.calibration[:n]]
    return [[(3 + 7 * i + 11 * j) % vocab for i in range(length)] for j in range(n)]


def export_gguf(ctx: RunContext, cfg: ExportConfig, model: Any) -> dict[str, Any]:
    """model.gguf, written atomically; with ``verify``, llama.cpp's logits on the same windows as transformers'."""
    from stages.io import gguf_export as G

    path = ctx.run_dir / "model.gguf"
    rec = ctx.recipe.model
    tok_gguf = G.source_gguf(rec.source, rec.gguf_file)
    out = G.write_gguf(model, path, cfg.gguf.dtype, tokenizer=None if tok_gguf else ctx.tokenizer,
                       tokenizer_gguf=tok_gguf, name=ctx.recipe.name)
    out["tokenizer_from"] = str(tok_gguf) if tok_gguf else "tokenizer.json"
    if not cfg.verify:
        return out
    missing = G.llama_cpp_missing()
    if missing:
        log.warning(f"export: model.gguf written but not run: {missing}")
        out["verify"] = {"skipped": missing}
        return out
    check = G.compare_with_transformers(model, path, _check_ids(ctx), n_threads=cfg.gguf.threads)
    out["verify"] = check
    if cfg.gguf.dtype == "f32" and (check["max_abs_diff"] > cfg.gguf.tolerance
                                    or check["argmax_agreement"] < cfg.gguf.min_argmax_agreement):
        raise RuntimeError(f"{path}: llama.cpp's logits differ from transformers' by {check['max_abs_diff']:.2e} "
                           f"(tolerance {cfg.gguf.tolerance:.0e}), argmax agreement {check['argmax_agreement']:.3f}")
    if not all(map(math.isfinite, check.values())):
        raise RuntimeError(f"{path}: llama.cpp gives non-finite logits ({check})")
    return out


def export_vllm(ctx: RunContext, cfg: ExportConfig, model: Any) -> dict[str, Any]:
    """model-vllm/ (stages.io.export_vllm), written atomically. vLLM runs in a venv of its own, so the check that
    it serves the folder is launch/vllm_check.py, not this stage."""
    from stages.core.files import atomic_dir
    from stages.io.export_vllm import write_vllm_export

    with atomic_dir(ctx.run_dir / "model-vllm") as tmp:
        out = write_vllm_export(model, ctx.tokenizer, tmp)
    out["path"] = str(ctx.run_dir / "model-vllm")
    return out


def _refusals(cfg: ExportConfig, model: Any) -> list[str]:
    """Why an engine cannot run this model as the listed formats would write it (each names the fix)."""
    out = []
    if "gguf" in cfg.formats:
        from stages.io.gguf_export import gguf_refusal

        out.append(gguf_refusal(model))
    if "vllm" in cfg.formats:
        from stages.io.export_vllm import vllm_refusal

        out.append(vllm_refusal(model))
    return [r for r in out if r]


def run(ctx: RunContext, cfg: ExportConfig) -> dict[str, Any]:
    from huggingface_hub import ModelCard

    from stages.core.files import atomic_dir
    from stages.io.models import DTYPES

    target = ctx.run_dir / "model"
    model = ctx.model
    diff = None
    ctx.exported = {"path": str(target), "reload_max_abs_diff": None} if "hf" in cfg.formats else {}
    if ctx.is_main:
        refusals = _refusals(cfg, model)
        if refusals:  # before anything is written: no half-done export
            raise ValueError("; ".join(refusals))
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
        from stages.io.hub import push_folder

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
