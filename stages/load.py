"""Stage 01-load: model + tokenizer from an alias, a local folder, a GGUF file or a hub id.

Its settings are the recipe's ``model:`` section (``prunelab.stages.io.config.ModelConfig``); it always runs,
since every later stage, restored or not, works on the model in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prunelab.registry import register_stage
from prunelab.stages.io.config import ModelConfig
from prunelab.stages.calibration.streamed import load_streaming
from prunelab.stages.io.offload import load_offloaded, placement

if TYPE_CHECKING:
    from prunelab.context import RunContext


def run(ctx: RunContext, cfg: ModelConfig) -> dict[str, Any]:
    from accelerate.logging import get_logger  # lazy: torch-free

    from prunelab.stages.io.models import load_model  # lazy: torch-free

    if cfg.load == "streaming":  # a meta skeleton; blocks read from the shards when needed (stages.io.streaming)
        model, tokenizer = load_streaming(cfg)
    elif cfg.load == "offload":  # part in memory, the rest read from disk per forward (stages.io.offload)
        model, tokenizer = load_offloaded(cfg)
    else:
        model, tokenizer = load_model(cfg)
    ctx.model, ctx.tokenizer = model, tokenizer
    adapter = ctx.adapter
    info = {
        "source": cfg.source if cfg.gguf_file is None else f"{cfg.source}:{cfg.gguf_file}",
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "params_before": adapter.total_params(),
        "layers_before": adapter.num_blocks,
    }
    info.update(placement(model))  # load: offload: what is in memory, what on disk
    ctx.model_info.update(info)
    get_logger(__name__).info(f"loaded {info['source']}: {info['params_before']:,} params, {info['layers_before']} blocks",
                              main_process_only=True)
    return info


register_stage("load", ModelConfig, run, None, section="model")
