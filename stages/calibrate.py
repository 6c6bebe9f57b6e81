"""Stage: calibration data — N windows of L tokens, drawn with the seed, saved for resume.

Sources: a file or `datasets` split, a QA file rendered as text (``qa_text``), text the dense model
writes itself (``self_generated``, cached shard by shard in this stage's folder), or a weighted
``mix`` of those (``prunelab.stages.calibration.sources``). Whatever the source, every criterion and every
compensation downstream reads the same ``calibration.pt``.

``pipeline`` says how the score stages after it drive these windows through the model: ``full`` (the whole model
resident) or ``sequential`` (one block at a time; ``prunelab.stages.calibration.pipelines``). A criterion whose
statistics the pipeline cannot collect is refused here, at validation (``--dry-run``), with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from prunelab.registry import register_stage
from prunelab.stages.calibration.needs import resolve
from prunelab.stages.calibration.pipelines import FullPipeline, PipelineConfig, refusals
from prunelab.stages.calibration.sources import CalibrationSource, calibration_windows
from prunelab.stages.core.config import StrictModel
from prunelab.stages.criteria.registry import CRITERIA, kind_of
from prunelab.stages.io.config import TextSource

if TYPE_CHECKING:
    from prunelab.context import RunContext


class CalibrateConfig(StrictModel):
    type: Literal["calibrate"]
    source: CalibrationSource = Field(
        ..., description="calibration text (valid/train splits only, never test): {path: …}, {dataset: …}, "
        "{qa_text: file.jsonl}, {self_generated: {…}} or {mix: [{source: …, weight: …}, …]}")
    num_samples: int = Field(32, ge=1, description="number of windows N")
    seq_len: int = Field(512, ge=2, description="tokens per window L")
    # added later: left out of dumps at their defaults
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"sampling": "windows", "pipeline": FullPipeline()}
    sampling: Literal["windows", "llm_pruner"] = Field(
        "windows", description="windows: N windows at seeded offsets of the joined token stream; llm_pruner: as the "
        "official LLM-Pruner, N distinct rows (lines of a .txt) of ≥ L tokens drawn with Python's random(seed), one "
        "random L-token slice each (a file or dataset source only; docs/llm-pruner-parity.md)")

    pipeline: PipelineConfig = Field(
        default_factory=FullPipeline, description="how later score stages drive the windows through the model: full "
        "(whole model resident) or sequential (one block resident: {type: sequential, propagate: dense, "
        "memory_budget_gb: 4, offload_dir: …}); docs/calibration.md")

    def check_order(self, key: str, seen: list[str], stages: dict[str, Any]) -> list[str]:
        """Every later score stage's statistics must be ones this pipeline collects (the reason when not)."""
        keys, problems = list(stages), []
        for k in keys[keys.index(key) + 1 :]:
            needs_of = getattr(stages[k], "calibration_needs", None)
            if needs_of is None:
                continue
            refused = refusals(self.pipeline, needs_of(k, stages))
            kind = kind_of(stages[k].units)
            for need, why in refused.items():
                who = [n for n in stages[k].effective_criteria(k, stages) if need in _closure(CRITERIA.get(kind, n).needs)]
                problems.append(f"pipeline: {self.pipeline.type} cannot collect {need!r} for stages.{k} "
                                f"({', '.join(who) if who else 'what its later prune stages need'}): {why}; use "
                                "pipeline: full or other criteria")
        return problems

    @model_validator(mode="after")
    def _rows_need_text(self) -> CalibrateConfig:
        if self.sampling == "llm_pruner" and type(self.source) is not TextSource:
            raise ValueError("sampling: llm_pruner draws rows of a file or dataset source ({path: …} or {dataset: …}); "
                             "use sampling: windows for this source")
        return self



def _closure(needs: frozenset[str]) -> set[str]:
    """A criterion's needs with what they require (``fisher`` brings ``grad``)."""
    return {spec.name for spec in resolve(needs)}


def run(ctx: RunContext, cfg: CalibrateConfig) -> dict[str, Any]:
    import torch  # lazy: torch-free

    if cfg.sampling == "llm_pruner":
        from prunelab.stages.calibration.rows import llm_pruner_windows, text_rows  # lazy: torch-free

        ctx.calibration = llm_pruner_windows(text_rows(cfg.source), ctx.tokenizer, cfg.num_samples, cfg.seq_len,
                                             ctx.recipe.seed)
    else:
        ctx.calibration = calibration_windows(cfg.source, ctx.model, ctx.tokenizer, cfg.num_samples, cfg.seq_len,
                                              ctx.recipe.seed, ctx.stage_dir / "generated", ctx.progress)
    if ctx.is_main:
        tmp = ctx.stage_dir / ".calibration.pt.tmp"
        torch.save(ctx.calibration, tmp)
        tmp.replace(ctx.stage_dir / "calibration.pt")
    return {"source": cfg.source.describe(), "num_samples": cfg.num_samples, "seq_len": cfg.seq_len}


def restore(ctx: RunContext, cfg: CalibrateConfig, outputs: dict[str, Any], stage_dir: Path) -> None:
    import torch  # lazy: torch-free

    ctx.calibration = torch.load(stage_dir / "calibration.pt", weights_only=True)


register_stage("calibrate", CalibrateConfig, run, restore)
