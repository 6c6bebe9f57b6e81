"""The criteria × targets benchmark (``recipes/bench/smollm2-*.yaml``): every criterion at every target, every width
method at one ratio, on one model, one calibration set, one evaluation — compiled into rows of recipes.

The short form stays what the shipped files say (``criteria``, ``targets``, ``width``, ``calibration``, and an
evaluate stage's ``perplexity`` / ``tasks`` / ``speed`` at top level), validated by :class:`GridSpec` with the
stages' own settings classes. :func:`compile_grid` turns it into a :class:`~prunelab.benchmarks.spec.Bench`: a
``dense`` row (load → evaluate), one row per (target, criterion) (calibrate → score → prune blocks → evaluate) and
one per width method (calibrate → score → prune width / hidden → evaluate). :func:`assemble` reads the rows' run
directories back into ``bench.json``'s rows, field for field as the in-process bench of before wrote them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from prunelab.benchmarks.spec import BenchError
from prunelab.metrics import peak_memory_mb, versions
from prunelab.recipe import ModelConfig, StrictModel, TextSource, check_run_name
from prunelab.registry import load_stages
from prunelab.rundir import atomic_write_json
from prunelab.stages import criteria  # noqa: F401
from prunelab.stages.arch.llama import adapter_for
from prunelab.stages.calibration.sources import calibration_windows
from prunelab.stages.criteria.registry import criteria_for, validate_settings
from prunelab.stages.criteria.settings import LacoSettings
from prunelab.stages.surgery.plan import read_plan

# The rows reuse the stages' own settings classes (the frame reaches stages only through the registry): a width
# method IS a prune stage's width / hidden settings, a depth target its blocks settings, the evaluation an evaluate
# stage's — same fields, same validation, same errors as in a recipe.
PruneConfig: Any = load_stages().get("prune").config_cls
EvaluateConfig: Any = load_stages().get("evaluate").config_cls

class BenchCalibration(StrictModel):
    source: TextSource
    num_samples: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(1, ge=1)
    sampling: Literal["windows", "llm_pruner"] = Field(
        "windows", description="as the calibrate stage's: seeded windows of the joined stream, or the official "
        "LLM-Pruner sampler (distinct rows, one random slice each; docs/llm-pruner-parity.md)")


class WidthMethod(StrictModel):
    """One width-pruning row: the prune stage's settings that make the method (units width by default, or hidden;
    its ``ratio`` is the bench's ``width_ratio``) and the row's label."""

    label: str | None = None
    prune: PruneConfig
    settings: dict[str, Any] = Field(default_factory=dict, description="the criterion's own settings (as a score "
                                     "stage's settings.<criterion>), e.g. {reduction: sum, grouping: llm_pruner} for taylor")
    _own: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _criterion_settings(self) -> WidthMethod:
        if self.settings:  # validated once, before any model loads; the scoring pass takes the model made here
            self._own = validate_settings("width", {self.prune.criterion: self.settings})[self.prune.criterion]
        return self

    def criterion_settings(self) -> Any:
        """The criterion's validated settings model (None: the criterion's defaults)."""
        return self._own

    def settings_key(self) -> str:
        """Rows share a scoring pass when criterion and settings agree."""
        return self.prune.criterion + (json.dumps(self.settings, sort_keys=True) if self.settings else "")

    def name(self) -> str:
        c = self.prune
        if c.units == "hidden":
            return self.label or f"{c.criterion} (hidden channels)"
        return self.label or f"{c.criterion} ({c.allocation.type}, {c.attention}, comp {c.compensation.type})"


class GridSpec(StrictModel):
    """A bench file. ``perplexity`` / ``tasks`` / ``speed`` (written at top level) are an evaluate stage's settings;
    ``targets`` rows are prune blocks settings without ``criterion`` (every criterion runs at every target); ``width``
    rows are prune width / hidden settings without ``ratio``, plus an optional ``label``."""

    name: str
    seed: int = 0
    output_dir: str = "runs/bench"
    model: ModelConfig

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_run_name(v)  # the bench writes under <output_dir>/<name>, like a run
    calibration: BenchCalibration
    evaluate: EvaluateConfig = Field(..., description="perplexity, tasks (lm-eval) and speed, as an evaluate stage's")
    criteria: list[str] = Field(default_factory=list, description="depth criteria, each run at every target")
    targets: list[PruneConfig] = Field(default_factory=list, description="{num_blocks: N} or {ratio: r, rounding: ...}")
    laco: Any = Field(default_factory=dict, description="settings of the `laco` criterion (as score.settings.laco in a recipe)")
    cost_ratio: bool = Field(True, description="time the cached PPL criterion against one full forward per candidate")
    width: list[WidthMethod] = Field(default_factory=list, description="width methods, all at width_ratio")
    width_ratio: float = Field(0.2, gt=0, lt=1, description="fraction of ALL parameters removed by every width method")

    @model_validator(mode="before")
    @classmethod
    def _as_stage_settings(cls, data: Any) -> Any:
        """Spell each section as the stage settings it is (the bench file keeps its short form)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data["evaluate"] = {"type": "evaluate", **{k: data.pop(k) for k in ("perplexity", "tasks", "speed") if k in data}}
        ratio = data.get("width_ratio", cls.model_fields["width_ratio"].default)
        data["width"] = [{"label": row.get("label"), "settings": row.get("settings") or {},
                          "prune": {"type": "prune", "units": "width", **({} if "layer_ratio" in row else {"ratio": ratio}),
                                    **{k: v for k, v in row.items() if k not in ("label", "settings")}}}
                         if isinstance(row, dict) else row for row in data.get("width") or []]
        first = (data.get("criteria") or [None])[0]
        data["targets"] = [{"type": "prune", "units": "blocks", "criterion": first, **row} if isinstance(row, dict) else row
                           for row in (data.get("targets") or [])] if first else []
        return data

    @field_validator("criteria")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        depth = criteria_for("blocks")
        bad = [n for n in names if n not in depth]
        if bad:
            raise ValueError(f"unknown criterion {bad}; choose from {', '.join(depth.names())}")
        return names


def target_label(cfg: Any) -> str:
    return f"{cfg.num_blocks} blocks" if cfg.num_blocks is not None else f"{cfg.ratio:.0%} params"


def _cost_ratio(model: Any, calib: Any, batch_size: int) -> dict[str, float]:
    """Cached removal-NLL (what the PPL criterion runs) vs naive full forwards, same data, same process."""
    from prunelab.stages.calibration.blocks import naive_removal_nll  # lazy: torch-free
    from prunelab.stages.calibration.full import collect_stats  # lazy: torch-free

    adapter = adapter_for(model)
    t0 = time.perf_counter()
    cached = collect_stats(model, calib, {"removal_nll"}, batch_size, progress=True)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = naive_removal_nll(adapter, calib, list(range(adapter.num_blocks)), batch_size)
    t_naive = time.perf_counter() - t0
    worst = max(abs(a - b) / abs(b) for a, b in zip(cached.removal_nll.tolist(), naive))
    return {"cached_s": round(t_cached, 2), "naive_s": round(t_naive, 2), "ratio": round(t_cached / t_naive, 3),
            "max_rel_diff": worst}


def _speedup(row: dict[str, Any], dense: dict[str, Any]) -> str:
    """Decode tokens/s relative to dense, per batch size, beside the ideal params_before / params_after."""
    sp, dsp = row["eval"].get("speed"), dense["eval"].get("speed")
    if not sp or not dsp:
        return "—"
    if "paired" in sp:  # interleaved pairs with the dense model (stages.evaluation.speed.measure_speedup)
        parts = [f"{v:.2f}×" for v in sp["paired"]["decode_speedup"].values()]
    else:  # the dense row (it has no pair): its own tokens/s over the dense row's, 1.00×
        parts = [f"{sp['decode_tok_s'][b] / dsp['decode_tok_s'][b]:.2f}×" for b in sp["decode_tok_s"]]
    return " / ".join(parts) + f" (ideal {dense['params'] / row['params']:.2f}×)"


def _acc(result: dict[str, Any], key: str) -> str:
    """An accuracy with its standard error where lm-eval gave one (100 questions: ± 5 points; 2,376: ± 1)."""
    err = result.get(f"{key}_stderr")
    return f"{result[key]:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else "")


def _row_total(row: dict[str, Any]) -> float:
    """A row's "total s" column: its scoring plus its evaluation."""
    return row["score_s"] + row["eval"].get("eval_s", 0.0)


def _totals(report: dict[str, Any]) -> str:
    """The run's wall time and peak memory; a resumed run's are only its own (the reused rows ran in earlier
    processes), so it says so and adds the rows' own seconds rather than pass off an assembly's as the bench's."""
    seconds, rss = f"{report['total_s']:.0f} s", f"{report['peak_memory_mb']['cpu_rss']:.0f} MB"
    if not report.get("resumed"):
        return f"Total {seconds}, overall peak RSS {rss}."
    rows = sum(_row_total(r) for r in report["rows"])
    return f"This resumed run itself: {seconds}, peak RSS {rss}; the rows' total s add up to {rows:.0f} s."


def _threads(report: dict[str, Any]) -> str:
    """The CPU threads the timings ran at; rows from an earlier (resumed) process at another count are marked †."""
    own = report["torch_threads"]
    others = sorted({r["eval"].get("torch_threads", own) for r in report["rows"]} - {own})
    return f"{own} CPU threads" + (f" († rows ran in an earlier process at {'/'.join(map(str, others))})" if others else "")


def to_markdown(report: dict[str, Any], command: str) -> str:
    first = report["rows"][0]["eval"]
    names = [n for n, r in first.items() if isinstance(r, dict) and "ppl" in r]
    tasks = [n for n, r in first.items() if isinstance(r, dict) and "acc" in r]
    speed = "speed" in first
    head = ("| target | criterion | params | blocks | removed blocks | "
            + " | ".join(f"{n} PPL (seq {first[n]['seq_len']}; × dense)" for n in names)
            + "".join(f" | {n} acc | {n} acc_norm" for n in tasks)
            + " | scoring s | total s |" + (" decode speedup (bs " + "/".join(first["speed"]["decode_tok_s"]) + ") |" if speed else ""))
    lines = [head, "|" + "---|" * (7 + len(names) + 2 * len(tasks) + int(speed))]
    dense = report["rows"][0]
    for r in report["rows"]:
        # every domain's ratio to the dense row, so a number that holds only in the calibration domain shows itself
        ppl = " | ".join(f"{r['eval'][n]['ppl']:.2f} ({r['eval'][n]['ppl'] / dense['eval'][n]['ppl']:.2f}×)" for n in names)
        acc = "".join(f" | {_acc(r['eval'][n], 'acc')} | {_acc(r['eval'][n], 'acc_norm')}" for n in tasks)
        removed = r["removed_blocks"] or ("uniform widths" if r.get("uniform") else "per-layer widths" if "uniform" in r else "—")
        total = _row_total(r)
        other = r["eval"].get("torch_threads", report["torch_threads"]) != report["torch_threads"]
        lines.append(f"| {r['target']} | {r['criterion']}{' †' if other else ''} | {r['params'] / 1e6:.2f}M ({r['achieved_ratio']:.1%} cut) | "
                     f"{r['layers']} | {removed} | {ppl}{acc} | {r['score_s']:.1f} | {total:.1f} |"
                     + (f" {_speedup(r, dense)} |" if speed else ""))
    cal = report["calibration"]
    proto = "; ".join(first[n]["protocol"] for n in names + tasks) + (f"; speed: {first['speed']['protocol']}" if speed else "")
    paired = next((r["eval"]["speed"]["paired"] for r in report["rows"] if "paired" in r["eval"].get("speed", {})), None)
    if paired:
        proto += f"; decode speedup: {paired['protocol']}"
    lines += ["", (f"Command: `{command}`. Model `{report['model']}`, seed {report['seed']}; calibration "
              f"{cal['num_samples']} × {cal['seq_len']} tokens of `{cal['source']}`. Perplexity: {proto}. "
              f"Every row is its own recipe run (`rows/<row>/`): scoring seconds are its score stage (its own calibration "
              f"statistics pass: hooks, plus one backward per window for Taylor; optimal compensation's XᵀX in the same "
              f"pass), for a width row plus its prune stage (selection, allocation and compensation solve); "
              f"{_threads(report)}; total s = scoring + evaluating that row. {_totals(report)}")]
    if report.get("resumed"):
        lines += ["", (f"Resumed (`--resume`): {len(report['resumed'])} finished rows came from an earlier run of this "
                  f"bench with the same recipes; their seconds are that run's.")]
    c = report.get("ppl_cost_ratio")
    if c:
        lines += ["", (f"PPL-criterion cost (hidden states entering each block cached) vs one full forward per "
                  f"candidate, same calibration set, same process: **{c['cached_s']:.1f} s vs {c['naive_s']:.1f} s = "
                  f"{c['ratio']:.2f}×** (scores agree to {c['max_rel_diff']:.1e} relative).")]
    return "\n".join(lines) + "\n"




# ----------------------------------------------------------------------------- short form → rows
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("%", "pct")).strip("-.") or "row"


def validate_grid(raw: dict[str, Any]) -> GridSpec:
    """The short form, checked with the stages' own settings classes (a bad criterion or width setting is named)."""
    try:
        grid = GridSpec.model_validate(raw)
        grid.laco = LacoSettings.model_validate(grid.laco)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors()]
        raise BenchError("the bench spec is not valid:\n  - " + "\n  - ".join(lines)) from None
    return grid


def compile_grid(raw: dict[str, Any]) -> dict[str, Any]:
    """The rows of a criteria × targets spec, each the recipe that makes it, as a Bench's data."""
    grid = validate_grid(raw)
    cal = grid.calibration
    head = {"seed": grid.seed, "model": grid.model.model_dump(mode="json", exclude_defaults=True)}
    evaluation = grid.evaluate.model_dump(mode="json", exclude={"type", "label"})
    calibrate = {"type": "calibrate", "source": cal.source.model_dump(mode="json", exclude_none=True),
                 "num_samples": cal.num_samples, "seq_len": cal.seq_len, "sampling": cal.sampling}
    rows = [{"name": "dense", "meta": {"dense": True},
             "recipe": {**head, "stages": {"eval": {"type": "evaluate", "label": "dense", **evaluation}}}}]
    for t, target in enumerate(grid.targets):
        for name in grid.criteria:
            cfg = target.model_copy(update={"criterion": name})
            score = {"type": "score", "units": "blocks", "criteria": [name], "batch_size": cal.batch_size}
            if name == "laco":
                score["settings"] = {"laco": grid.laco.model_dump(mode="json")}
            rows.append({"name": f"{name}--{_slug(target_label(cfg))}" + (f"--t{t}" if len(grid.targets) > 1 else ""),
                         "meta": {"target": target_label(cfg), "criterion": name},
                         "recipe": {**head, "stages": {"calibrate": calibrate, "score": score,
                                                       "prune": cfg.model_dump(mode="json"),
                                                       "eval": {"type": "evaluate", **evaluation}}}})
    for j, m in enumerate(grid.width):
        score = {"type": "score", "units": "width", "criteria": [m.prune.criterion], "batch_size": 1}
        if m.settings:
            score["settings"] = {m.prune.criterion: m.settings}
        rows.append({"name": f"width{j:02d}--{_slug(m.prune.criterion)}", "meta": {"label": m.name(), "width_ratio": grid.width_ratio},
                     "recipe": {**head, "stages": {"calibrate": calibrate, "score": score,
                                                   "prune": m.prune.model_dump(mode="json"),
                                                   "eval": {"type": "evaluate", **evaluation}}}})
    sources = [cal.source] + [p.source for p in grid.evaluate.perplexity.values()]
    checked = [s.path for s in sources if getattr(s, "path", None)] + [t.path for t in grid.evaluate.tasks.values() if t.path]
    info = {"model": grid.model.source, "seed": grid.seed, "width_ratio": grid.width_ratio,
            "calibration": {"source": cal.source.describe(), "num_samples": cal.num_samples, "seq_len": cal.seq_len},
            "checksums": checked, "cost_ratio": bool(grid.cost_ratio and grid.criteria),
            "cost_ratio_setup": {"model": grid.model.model_dump(mode="json"), "calibrate": calibrate,
                                 "batch_size": cal.batch_size}}
    return {"name": grid.name, "kind": "grid", "output_dir": grid.output_dir, "rows": rows, "info": info}


# ----------------------------------------------------------------------------- rows' run directories → bench.json
def _eval(metrics: dict[str, Any], label: str, threads: int) -> dict[str, Any]:
    """A row's evaluation as bench.json keeps it: each perplexity's number and protocol, tasks and speed as measured."""
    out: dict[str, Any] = {}
    for name, r in metrics["eval"].get(label, {}).items():
        out[name] = {k: r[k] for k in ("ppl", "seq_len", "tokens", "protocol")} if "ppl" in r else r
    out["eval_s"] = round(metrics["timing_s"].get("evaluate", 0.0), 1)
    out["torch_threads"] = threads
    return out


def grid_row(row: Any, run_dir: Path, metrics: dict[str, Any], threads: int) -> dict[str, Any]:
    """One bench.json row from its run directory (``metrics.json`` and the prune stage's ``plan.json``)."""
    model, timing = metrics["model"], metrics["timing_s"]
    if row.meta.get("dense"):
        return {"target": "—", "criterion": "dense", "params": model["params_before"], "layers": model["layers_before"],
                "removed_blocks": [], "achieved_ratio": 0.0, "score_s": 0.0, "eval": _eval(metrics, "dense", threads)}
    plan = read_plan(run_dir)
    assert plan is not None, f"{run_dir}: a pruned row without plan.json"
    if plan.kind == "depth":
        return {"target": row.meta["target"], "criterion": row.meta["criterion"], "params": plan.params_after,
                "layers": plan.layers_after, "removed_blocks": plan.removed_blocks, "achieved_ratio": plan.achieved_ratio,
                "score_s": round(timing.get("score", 0.0), 2), "eval": _eval(metrics, "pruned", threads)}
    shapes = [s.model_dump() for s in plan.shapes_after]
    params = model["params_after"]
    return {"target": f"{row.meta['width_ratio']:.0%} params (width)", "criterion": row.meta["label"], "params": params,
            "layers": len(shapes), "removed_blocks": [], "achieved_ratio": round(1 - params / plan.params_before, 6),
            "score_s": round(timing.get("score", 0.0) + timing.get("prune", 0.0), 2),
            "plan_s": round(timing.get("prune", 0.0), 2), "uniform": plan.uniform,
            "kept_widths": {k: [s[k] for s in shapes] for k in shapes[0]}, "eval": _eval(metrics, "pruned", threads)}


def _scores(bench: Any, finished: dict[str, Any]) -> dict[str, Any]:
    """Each depth criterion's scores (its first target's), as the score stage saved them."""
    out: dict[str, Any] = {}
    for row, recipe in zip(bench.rows, bench.recipes()):
        name = row.meta.get("criterion")
        if name and name not in out and finished.get(row.name) is not None:
            path = next(recipe.run_dir.glob("*-score/scores.json"), None)
            if path is not None:
                out[name] = json.loads(path.read_text())[name]
    return out


def cost_ratio(info: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The PPL criterion's cached removal-NLL timed against one full forward per candidate, on the rows' own
    calibration windows (a measurement of the library, not a row), kept in ``folder`` once done."""
    setup = info["cost_ratio_setup"]
    path = folder / "cost-ratio.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("setup") == setup:
            return saved["value"]
    from accelerate.utils import set_seed  # lazy: torch-free

    from prunelab.stages.io.models import load_model  # lazy: torch-free

    set_seed(info["seed"])
    model, tok = load_model(ModelConfig.model_validate(setup["model"]))
    cfg = load_stages().get("calibrate").config_cls.model_validate(setup["calibrate"])
    if cfg.sampling == "llm_pruner":
        from prunelab.stages.calibration.rows import llm_pruner_windows, text_rows  # lazy: torch-free

        calib = llm_pruner_windows(text_rows(cfg.source), tok, cfg.num_samples, cfg.seq_len, info["seed"])
    else:
        calib = calibration_windows(cfg.source, model, tok, cfg.num_samples, cfg.seq_len, info["seed"],
                                    folder / "generated", False)
    value = _cost_ratio(model, calib, setup["batch_size"])
    atomic_write_json(path, {"setup": setup, "value": value})
    return value


def assemble(bench: Any, finished: dict[str, Any], reused: list[str], checked: list[str], t_start: float) -> dict[str, Any]:
    """``bench.json``: the rows that are finished, in spec order, with the bench's header."""
    import torch  # lazy: torch-free

    threads = torch.get_num_threads()
    rows = [grid_row(row, recipe.run_dir, finished[row.name], threads)
            for row, recipe in zip(bench.rows, bench.recipes()) if finished.get(row.name) is not None]
    info = bench.info
    cost = cost_ratio(info, bench.rows_dir) if info.get("cost_ratio") else None
    return {"name": bench.name, "model": info["model"], "seed": info["seed"], "calibration": info["calibration"],
            "checksums_verified": checked, "rows": rows, "scores": _scores(bench, finished), "ppl_cost_ratio": cost,
            "total_s": round(time.perf_counter() - t_start, 1), "peak_memory_mb": peak_memory_mb(),
            "versions": versions(), "torch_threads": threads, "resumed": reused}
