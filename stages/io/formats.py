"""The export stage's formats as library code: the vanilla reload check, ``model.gguf`` checked in llama.cpp,
``model-vllm/``, and the refusals checked before anything is written. The stage (``stages/export.py``) stays thin:
it validates ``formats`` against :data:`FORMATS` and calls each one's ``write``; this module writes and checks them.

A format is one :func:`register_format` call (name, writer, the file that proves it was written, the refusal checked
before any format is written); ``formats: [...]`` in a recipe then accepts it. Torch-free at import.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab.stages.core.files import atomic_dir
from prunelab.stages.core.registry import Registry
from prunelab.stages.io import gguf_export as G
from prunelab.stages.io.card import model_card
from prunelab.stages.io.gguf_export import gguf_refusal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportFormat:
    """``write(ctx, cfg, model) -> dict`` writes the format atomically under the run directory and returns what the
    stage records (``top_level``: merged into the stage's outputs, as ``hf`` does; else under ``name``); ``output``:
    the path, relative to the run directory, whose presence proves it was written (``--resume``); ``refusal(model)``:
    why an engine cannot run the model in this format (None: it can), checked for every listed format first."""

    name: str
    write: Callable[[Any, Any, Any], dict[str, Any]]
    output: str
    refusal: Callable[[Any], str | None] | None = None
    top_level: bool = False


FORMATS: Registry[ExportFormat] = Registry("export format")


def register_format(name: str, write: Callable[[Any, Any, Any], dict[str, Any]], output: str,
                    refusal: Callable[[Any], str | None] | None = None, top_level: bool = False) -> ExportFormat:
    """Register an export format (a name registered twice is an error)."""
    return FORMATS.register(name, ExportFormat(name, write, output, refusal, top_level))


def verify_reload(model: Any, path: Path, tolerance: float) -> float:
    """Max |Δlogit| between ``model`` and a fresh vanilla load of ``path``; raise above ``tolerance``."""
    import torch  # lazy: torch-free

    from prunelab.stages.io.loader import load_pruned  # lazy: torch-free

    fresh = load_pruned(path, dtype=next(model.parameters()).dtype, device=model.device)
    ids = torch.arange(3, 3 + 24, device=model.device).unsqueeze(0) % model.config.vocab_size
    with torch.inference_mode():
        diff = (fresh(ids).logits.float() - model(ids).logits.float()).abs().max().item()
    if diff > tolerance:
        raise RuntimeError(f"exported model at {path} gives logits differing by {diff:.2e} > {tolerance:.0e}")
    return diff


def _check_ids(ctx: Any, n: int = 2, length: int = 128) -> list[list[int]]:
    """Windows for the GGUF check: the first calibration windows when there are some, else a fixed id ramp."""
    vocab = ctx.model.config.vocab_size
    if ctx.calibration is not None and getattr(ctx.calibration, "ndim", 0) == 2:
        return [[int(t) for t in row[:length]] for row in ctx.calibration[:n]]
    return [[(3 + 7 * i + 11 * j) % vocab for i in range(length)] for j in range(n)]


def export_gguf(ctx: Any, cfg: Any, model: Any) -> dict[str, Any]:
    """model.gguf, written atomically; with ``verify``, llama.cpp's logits on the same windows as transformers'."""
    path = ctx.run_dir / "model.gguf"
    rec = ctx.recipe.model
    tok_gguf = G.source_gguf(rec.source, rec.gguf_file)
    out = G.write_gguf(model, path, cfg.gguf.dtype, tokenizer=None if tok_gguf else ctx.tokenizer,
                       tokenizer_gguf=tok_gguf, name=ctx.recipe.name, embedding_dtype=cfg.gguf.embedding_dtype)
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


def export_vllm(ctx: Any, cfg: Any, model: Any) -> dict[str, Any]:
    """model-vllm/ (stages.io.export_vllm), written atomically. vLLM runs in a venv of its own, so the check that
    it serves the folder is launch/vllm_check.py, not this stage."""
    from prunelab.stages.io.export_vllm import write_vllm_export  # lazy: torch-free

    with atomic_dir(ctx.run_dir / "model-vllm") as tmp:
        out = write_vllm_export(model, ctx.tokenizer, tmp)
    out["path"] = str(ctx.run_dir / "model-vllm")
    return out


def export_hf(ctx: Any, cfg: Any, model: Any) -> dict[str, Any]:
    """model/ (``save_pretrained``, tokenizer, model card), written atomically; with ``verify``, reloaded by vanilla
    transformers and its logits compared (float32: ``tolerance``; a half dtype: 1e-1)."""
    from huggingface_hub import ModelCard  # lazy: startup

    target, diff = ctx.run_dir / "model", None
    with atomic_dir(target) as tmp:
        shards = {} if getattr(cfg, "shard_mb", None) is None else {"max_shard_size": int(cfg.shard_mb * 2**20)}
        model.save_pretrained(tmp, safe_serialization=True, **shards)
        ctx.tokenizer.save_pretrained(tmp)
        ModelCard(model_card(ctx)).save(tmp / "README.md")
        if cfg.verify:
            diff = verify_reload(model, tmp, cfg.tolerance if cfg.dtype in ("same", "float32") else 1e-1)
    return {"path": str(target), "reload_max_abs_diff": diff}


def _gguf_refusal(model: Any) -> str | None:
    return gguf_refusal(model)


def _vllm_refusal(model: Any) -> str | None:
    from prunelab.stages.io.export_vllm import vllm_refusal  # lazy: torch-free

    return vllm_refusal(model)


def refusals(cfg: Any, model: Any) -> list[str]:
    """Why an engine cannot run this model as the listed formats would write it (each names the fix)."""
    out = [FORMATS.get(f).refusal(model) for f in cfg.formats if FORMATS.get(f).refusal is not None]  # type: ignore[misc]
    return [r for r in out if r]


register_format("hf", export_hf, "model/config.json", top_level=True)
register_format("gguf", export_gguf, "model.gguf", _gguf_refusal)
register_format("vllm", export_vllm, "model-vllm/config.json", _vllm_refusal)
