"""Stage: evaluate the model as it is now (dense, pruned, recovered) — perplexity with its protocol.

With no settings it runs the default suite on two text domains and ARC-Easy in full
(``prunelab.stages.evaluation.suite``); metrics.json adds each domain's ratio to dense (``ratio_to_dense``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from prunelab.registry import register_stage
from prunelab.stages.core.config import InputFile, StrictModel
from prunelab.stages.core.files import atomic_write_json
from prunelab.stages.evaluation.suite import with_default_suite
from prunelab.stages.evaluation.zeroshot import LOCAL_TASKS, evaluate_task, expand_preset
from prunelab.stages.io.offload import placement, release, streamed_evaluation_model
from prunelab.stages.io.qa import TextOrQASource

if TYPE_CHECKING:
    from prunelab.context import RunContext


class PerplexityConfig(StrictModel):
    source: TextOrQASource = Field(..., description="evaluation text: a test split, or {qa_text: file.jsonl} (questions + gold answers)")
    seq_len: int = Field(512, ge=2, description="window length; papers use 128 (LLM-Pruner, FLAP) or 2048 (SliceGPT, SLEB)")
    max_tokens: int | None = Field(None, ge=2, description="token budget: score only the first N tokens")
    batch_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _budget(self) -> PerplexityConfig:
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens={self.max_tokens} is less than one window (seq_len={self.seq_len}); raise it")
        return self


class TaskConfig(StrictModel):
    """A zero-shot task run by lm-evaluation-harness on the in-memory model (main process only)."""

    path: InputFile | None = Field(None, description="local JSONL (offline); e.g. ../shared/data/arc/arc_easy_test.jsonl. "
                             "None: lm-eval's own task, downloaded from the hub")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N questions (state it next to the number)")
    num_fewshot: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)


class SpeedConfig(StrictModel):
    prompt_len: int = Field(128, ge=1)
    new_tokens: int = Field(32, ge=2)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    repeats: int = Field(3, ge=1, description="median of this many timed runs")
    warmup: int = Field(1, ge=0, description="untimed runs first")
    paired: bool = Field(False, description="also time the dense model (reloaded from the recipe's source) interleaved "
                         "with this one and report the median decode-time ratio: on a shared CPU, tokens/s measured "
                         "minutes apart do not divide into a trustworthy speedup")

    LATER_FIELDS: ClassVar[dict[str, Any]] = {"paired": False}  # older run directories keep their chain hashes


class EvaluateConfig(StrictModel):
    type: Literal["evaluate"]
    label: Literal["dense", "pruned", "recovered", "control"] | None = Field(
        None, description="key in metrics.json eval; default: the model's state (dense before prune, pruned after)"
    )
    perplexity: dict[str, PerplexityConfig] = Field(default_factory=dict, description="dataset name → settings")
    tasks: dict[str, TaskConfig] = Field(default_factory=dict, description="lm-eval task name → settings, e.g. arc_easy")
    speed: SpeedConfig | None = Field(None, description="measure prefill latency, decode tokens/s and peak memory")

    @model_validator(mode="before")
    @classmethod
    def _suite(cls, raw: Any) -> Any:
        """Nothing named: the default two-domain suite (stages.evaluation.suite), written out in the resolved recipe."""
        if isinstance(raw, dict) and isinstance(raw.get("tasks"), str):  # tasks: zeroshot_suite (a preset's name)
            raw = {**raw, "tasks": expand_preset(raw["tasks"])}
        return with_default_suite(raw)

    @model_validator(mode="after")
    def _local_tasks(self) -> EvaluateConfig:
        for name, t in self.tasks.items():
            if t.path is not None and name not in LOCAL_TASKS:
                raise ValueError(f"tasks.{name}: local files are supported for {sorted(LOCAL_TASKS)}; drop `path` to use "
                                 "lm-eval's hub task")
        return self


def run(ctx: RunContext, cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate the model under its label; after a recovery with ``control: true`` also the control."""
    label = cfg.label or ctx.state
    offloaded = streamed_evaluation_model(ctx.model, ctx.recipe, ctx.stage_key, ctx.run_dir)  # None unless streamed
    models = [(label, ctx.model if offloaded is None else offloaded)]
    if label == "recovered" and "control" in ctx.variants:
        models.append(("control", ctx.variants["control"]))
    out: dict[str, Any] = {}
    saved = {}
    for lab, model in models:
        results = _evaluate_one(ctx, cfg, model, lab)
        ctx.evals.setdefault(lab, {}).update(results)
        saved[lab] = results
        out[lab] = {n: round(r["ppl"], 4) if "ppl" in r else {k: r.get(k) for k in ("acc", "acc_norm")} for n, r in results.items()
                    if n != "speed"}
    extra = placement(models[0][1])  # load: offload, or a streamed run's folder: what was in memory, what on disk
    if offloaded is not None:
        release(offloaded)
    if ctx.is_main:
        atomic_write_json(ctx.stage_dir / "results.json", {"label": label, "results": saved[label], "all": saved, **extra})
    return {"label": label, **out[label], **({"control": out["control"]} if "control" in out else {}), **extra}


def _evaluate_one(ctx: RunContext, cfg: EvaluateConfig, model: Any, label: str) -> dict[str, Any]:
    from prunelab.stages.evaluation.perplexity import protocol, windowed_perplexity  # lazy: torch-free
    from prunelab.stages.io.text import tokenized_source  # lazy: torch-free

    results: dict[str, Any] = {}
    for name, p in cfg.perplexity.items():
        r = windowed_perplexity(model, tokenized_source(ctx.tokenizer, p.source), p.seq_len, p.max_tokens, p.batch_size, ctx.progress, f"ppl {name} ({label})")
        r["source"] = p.source.describe()
        r["protocol"] = protocol(r["source"], p.seq_len, r["tokens"], r["windows"])
        results[name] = r
    for name, t in cfg.tasks.items():
        if ctx.is_main:  # HFLM on a model object is not meant for a multi-process launch
            results[name] = evaluate_task(model, ctx.tokenizer, name, t.path, t.limit, t.batch_size, t.num_fewshot, ctx.recipe.seed)
    if cfg.speed is not None and ctx.is_main:
        from prunelab.stages.evaluation.speed import measure_speed  # lazy: torch-free

        s = cfg.speed
        results["speed"] = measure_speed(model, s.prompt_len, s.new_tokens, tuple(s.batch_sizes), s.repeats, s.warmup, ctx.recipe.seed)
        if s.paired and label != "dense":
            from prunelab.stages.evaluation.speed import measure_speedup  # lazy: torch-free
            from prunelab.stages.io.models import load_model  # lazy: torch-free

            dense = load_model(ctx.recipe.model)[0].to(next(model.parameters()).device)
            results["speed"]["paired"] = measure_speedup(model, dense, s.prompt_len, s.new_tokens, tuple(s.batch_sizes),
                                                         s.repeats, s.warmup, ctx.recipe.seed)
            del dense
    return results


def restore(ctx: RunContext, cfg: EvaluateConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    data = json.loads((stage_dir / "results.json").read_text())
    for label, results in data.get("all", {data["label"]: data["results"]}).items():
        ctx.evals.setdefault(label, {}).update(results)


register_stage("evaluate", EvaluateConfig, run, restore)
