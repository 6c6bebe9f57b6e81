"""Benchmark: every listed criterion × every target on ONE model, ONE calibration set, in ONE process.

    python pipeline/bench.py recipes/bench/smollm2-depth.yaml [--update-readme docs/results.md]

Writes ``bench.json`` and ``bench.md`` under ``<output_dir>/<name>/`` and prints the table; every finished row is
also kept under ``rows/`` the moment it is done, so ``--resume`` continues a killed run (``pipeline/bench_rows.py``). Each
criterion is scored on its own (its own calibration pass), so the scoring seconds are what that
criterion costs alone. The PPL criterion's cost is also measured against the naive "one full
forward per candidate" on the same calibration set, side by side, and reported as a ratio.
Checksums of the shared data are verified before anything runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):
    _root = str(Path(__file__).resolve().parents[1])
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _root

from pydantic import Field, PrivateAttr, field_validator, model_validator

from prunelab.bench_rows import BenchRowsError, RowCache
from prunelab.metrics import PeakRSS
from prunelab.recipe import ModelConfig, RecipeError, StrictModel, TextSource, check_run_name
from prunelab.registry import load_stages

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
        from prunelab.stages import criteria  # noqa: F401  (registers the criteria)
        from prunelab.stages.criteria.registry import validate_settings

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


class BenchRecipe(StrictModel):
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
        from prunelab.stages import criteria  # noqa: F401
        from prunelab.stages.criteria.registry import criteria_for

        depth = criteria_for("blocks")
        bad = [n for n in names if n not in depth]
        if bad:
            raise ValueError(f"unknown criterion {bad}; choose from {', '.join(depth.names())}")
        return names


def target_label(cfg: Any) -> str:
    return f"{cfg.num_blocks} blocks" if cfg.num_blocks is not None else f"{cfg.ratio:.0%} params"


def load_bench(path: str) -> BenchRecipe:
    from pydantic import ValidationError

    from prunelab.recipe import load_raw
    from prunelab.stages.criteria.settings import LacoSettings

    raw = load_raw(path)
    try:
        bench = BenchRecipe.model_validate(raw)
        bench.laco = LacoSettings.model_validate(bench.laco)
    except ValidationError as exc:
        raise RecipeError([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    return bench


def _width_spec(m: WidthMethod) -> dict[str, Any]:
    return {"label": m.label, "prune": m.prune.model_dump(mode="json"), "settings": m.settings}


def _width_rows(bench: BenchRecipe, model: Any, calib: Any, evaluate: Any, cache: RowCache,
                mine: Callable[[int], bool] = lambda i: True) -> list[dict[str, Any]]:
    """All width methods from ONE statistics pass over the shared calibration set (skipped when every row is
    already in ``cache``). Rows for which ``mine(index)`` is False are another shard's: neither run nor returned."""
    from prunelab.stages.calibration.full import collect_stats
    from prunelab.stages.calibration.width import summary_tensors
    from prunelab.stages.criteria.base import CriterionInputs
    from prunelab.stages.criteria.registry import CRITERIA
    from prunelab.stages.criteria.scoring import needs_for, score
    from prunelab.stages.selection.planning import make_hidden_plan, make_width_plan
    from prunelab.stages.surgery.apply import apply_plan

    done = {id(m): cache.get("width", _width_spec(m)) if mine(i) else {} for i, m in enumerate(bench.width)}
    if all(row is not None for row in done.values()):
        return [done[id(m)] for m in bench.width if done[id(m)]]
    names = list(dict.fromkeys(m.prune.criterion for m in bench.width))
    keyed = {m.settings_key(): m for m in bench.width}  # one score per (criterion, settings)
    hidden = {m.prune.criterion for m in bench.width if m.prune.units == "hidden"}
    with PeakRSS() as pass_mem:
        stats = collect_stats(model, calib, needs_for("width", names, {"hidden"} if hidden else ()), batch_size=1, progress=True)
    means = summary_tensors(stats)
    hessian_s = 0.0
    optimal = [m for m in bench.width if m.prune.units == "width" and m.prune.compensation.type == "optimal"
               and done[id(m)] is None]
    if optimal:  # its own pass, charged to the optimal rows only
        hstats = collect_stats(model, calib, {"hessian"}, batch_size=1, progress=True)
        means["gram"], hessian_s = summary_tensors(hstats)["gram"], hstats.seconds
        del hstats
    scored: dict[str, tuple[dict[str, Any], float, float]] = {}
    for key, m in keyed.items():
        if all(done[id(r)] is not None for r in bench.width if r.settings_key() == key):
            continue  # every row of this scoring is finished
        n = m.prune.criterion
        spec = CRITERIA.get("width", n)
        with PeakRSS() as mem:
            result = score(spec, CriterionInputs(model, stats, bench.seed, m.criterion_settings()), hidden=n in hidden).to_json()
        data_driven = bool(spec.needs)
        scored[key] = (result, result["seconds"], max(mem.peak_mb, pass_mem.peak_mb if data_driven else 0.0))
    rows = []
    for m in bench.width:
        if done[id(m)] is not None:
            rows += [done[id(m)]] if done[id(m)] else []
            continue
        cfg, label, key = m.prune, m.name(), m.settings_key()
        t_plan = time.perf_counter()
        if cfg.units == "hidden":
            plan, side = make_hidden_plan(scored[key][0], cfg, model), {}
        else:  # incl. allocation and compensation solve
            plan, side = make_width_plan(scored[key][0], cfg, model, means)
        pruned = apply_plan(copy.deepcopy(model), plan, side)
        t_plan = time.perf_counter() - t_plan
        params = sum(p.numel() for p in pruned.parameters())
        shapes = [s_.model_dump() for s_ in plan.shapes_after]
        rows.append(cache.put("width", _width_spec(m), {
            "target": f"{bench.width_ratio:.0%} params (width)", "criterion": label, "params": params,
            "layers": len(shapes), "removed_blocks": [], "achieved_ratio": round(1 - params / plan.params_before, 6),
            "score_s": round(scored[key][1] + t_plan + (hessian_s if m in optimal else 0.0), 2),
            "plan_s": round(t_plan, 2),
            "score_peak_rss_mb": round(scored[key][2]),
            "uniform": plan.uniform,
            "kept_widths": {k: [s_[k] for s_ in shapes] for k in shapes[0]},
            "eval": evaluate(pruned, label)}))
        del pruned
    return rows


def _score(name: str, model: Any, calib: Any, batch_size: int, num_remove: int, seed: int,
           settings: Any = None) -> tuple[dict[str, Any], float]:
    """One depth criterion alone: its own calibration pass, then the criterion (the score stage's scoring path)."""
    from prunelab.stages.calibration.full import collect_stats
    from prunelab.stages.criteria.base import CriterionInputs
    from prunelab.stages.criteria.registry import CRITERIA
    from prunelab.stages.criteria.scoring import needs_for, score

    spec = CRITERIA.get("depth", name)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        stats = collect_stats(model, calib, needs_for("depth", [name]) - {"calibration"}, batch_size, progress=True)
        inputs = CriterionInputs(model, stats, seed, settings, calib, batch_size, num_remove if spec.iterative else None)
        result = score(spec, inputs).to_json()
    result["peak_rss_mb"] = round(mem.peak_mb)
    return result, time.perf_counter() - t0


def _cost_ratio(model: Any, calib: Any, batch_size: int) -> dict[str, float]:
    """Cached removal-NLL (what the PPL criterion runs) vs naive full forwards, same data, same process."""
    from prunelab.stages.arch.llama import adapter_for
    from prunelab.stages.calibration.blocks import naive_removal_nll
    from prunelab.stages.calibration.full import collect_stats

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


def shared_settings(bench: BenchRecipe) -> dict[str, Any]:
    """What every row of the bench depends on: a cached row is reused only when all of it is unchanged."""
    return bench.model_dump(mode="json", include={"model", "seed", "calibration", "evaluate"})


def run_bench(bench: BenchRecipe, cache: RowCache | None = None, shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Every row of the bench; ``cache`` (see ``pipeline/bench_rows.py``) returns finished rows of a killed run.

    ``shard`` (i, n) runs only every n-th depth and width row from the i-th (shard 0 also the dense row and the
    cost ratio), so n processes sharing one ``cache`` split a long bench; a run without a shard then assembles it."""
    import torch
    from accelerate.utils import set_seed

    from prunelab.metrics import peak_memory_mb, versions
    from prunelab.stages.arch.llama import adapter_for
    from prunelab.stages.evaluation.perplexity import protocol, windowed_perplexity
    from prunelab.stages.evaluation.speed import measure_speed, measure_speedup
    from prunelab.stages.evaluation.zeroshot import evaluate_task
    from prunelab.stages.io.models import load_model
    from prunelab.stages.io.text import read_text, sample_windows, tokenize_text, verify_checksum
    from prunelab.stages.selection.blocks import make_plan, num_blocks_for
    from prunelab.stages.surgery.apply import apply_plan

    cache = cache or RowCache(None, {})
    index, count = shard

    def mine(i: int) -> bool:
        return i % count == index

    ev = bench.evaluate
    sources = [bench.calibration.source] + [p.source for p in ev.perplexity.values()]
    checked = [verify_checksum(s.path) for s in sources if s.path] + [verify_checksum(t.path) for t in ev.tasks.values() if t.path]
    set_seed(bench.seed)
    t_start = time.perf_counter()
    model, tok = load_model(bench.model)
    cal = bench.calibration
    if cal.sampling == "llm_pruner":
        from prunelab.stages.calibration.rows import llm_pruner_windows, text_rows

        calib = llm_pruner_windows(text_rows(cal.source), tok, cal.num_samples, cal.seq_len, bench.seed)
    else:
        calib = sample_windows(tokenize_text(tok, read_text(cal.source)), cal.num_samples, cal.seq_len, bench.seed)
    eval_ids = {n: tokenize_text(tok, read_text(p.source)) for n, p in ev.perplexity.items()}

    def evaluate(m: Any, label: str) -> dict[str, Any]:
        t_eval = time.perf_counter()
        out: dict[str, Any] = {}
        for n, p in ev.perplexity.items():
            r = windowed_perplexity(m, eval_ids[n], p.seq_len, p.max_tokens, p.batch_size, desc=f"ppl {label}")
            out[n] = {"ppl": r["ppl"], "seq_len": r["seq_len"], "tokens": r["tokens"],
                      "protocol": protocol(p.source.describe(), p.seq_len, r["tokens"], r["windows"])}
        for n, t in ev.tasks.items():
            out[n] = evaluate_task(m, tok, n, t.path, t.limit, t.batch_size, t.num_fewshot, bench.seed)
        if ev.speed is not None:
            sp = ev.speed
            out["speed"] = measure_speed(m, sp.prompt_len, sp.new_tokens, tuple(sp.batch_sizes), sp.repeats, sp.warmup, bench.seed)
            if m is not model:  # the table's speedup: paired, interleaved runs against the dense model
                out["speed"]["paired"] = measure_speedup(m, model, sp.prompt_len, sp.new_tokens, tuple(sp.batch_sizes),
                                                         sp.repeats, sp.warmup, bench.seed)
        out["eval_s"] = round(time.perf_counter() - t_eval, 1)
        out["torch_threads"] = torch.get_num_threads()  # a resumed bench may mix processes: each row says its own
        return out

    adapter = adapter_for(model)
    max_k = max((num_blocks_for(c, adapter) for c in bench.targets), default=0)
    rows: list[dict[str, Any]] = []
    if index == 0:
        rows.append(cache.fetch("dense", {}, lambda: {
            "target": "—", "criterion": "dense", "params": adapter.total_params(), "layers": adapter.num_blocks,
            "removed_blocks": [], "achieved_ratio": 0.0, "score_s": 0.0, "eval": evaluate(model, "dense")}))
    from prunelab.stages.criteria.settings import LacoSettings

    settings = {"laco": LacoSettings.model_validate(bench.laco)}

    def scored(name: str, k: int) -> dict[str, Any]:
        """One criterion's scores for removing ``k`` blocks (iterative criteria and LaCo depend on k), kept."""
        def run() -> dict[str, Any]:
            set_seed(bench.seed)
            result, seconds = _score(name, model, calib, bench.calibration.batch_size, k, bench.seed, settings.get(name))
            return {**result, "seconds": round(seconds, 2)}
        own = settings.get(name)
        return cache.fetch("score", {"criterion": name, "num_remove": k,
                                     "settings": own.model_dump(mode="json") if own is not None else None}, run)

    jobs = [(t, name) for t in range(len(bench.targets)) for name in bench.criteria]
    results: dict[str, Any] = {name: scored(name, max_k) for name in bench.criteria
                               if any(mine(i) for i, (_, n) in enumerate(jobs) if n == name)}
    for i, (t, name) in enumerate(jobs):
        if mine(i):
            base_cfg = bench.targets[t]
            cfg = base_cfg.model_copy(update={"criterion": name})
            k = num_blocks_for(cfg, adapter)
            if "merges" in results[name] and len(results[name]["order"]) != k:  # LaCo's merges depend on the target
                results[name] = scored(name, k)

            def row(name: str = name, cfg: Any = cfg) -> dict[str, Any]:
                plan = make_plan(results[name], cfg, adapter)
                pruned = apply_plan(copy.deepcopy(model), plan)
                return {"target": target_label(cfg), "criterion": name, "params": plan.params_after,
                        "layers": plan.layers_after, "removed_blocks": plan.removed_blocks,
                        "achieved_ratio": plan.achieved_ratio, "score_s": results[name]["seconds"],
                        "score_peak_rss_mb": results[name]["peak_rss_mb"],
                        "eval": evaluate(pruned, f"{name} @ {target_label(cfg)}")}
            scores = {f: v for f, v in results[name].items() if f not in ("seconds", "peak_rss_mb")}
            rows.append(cache.fetch("depth", {"target": cfg.model_dump(mode="json"), "scores": scores}, row))
    if bench.width:
        rows += _width_rows(bench, model, calib, evaluate, cache, lambda j: mine(len(jobs) + j))
    cost = (cache.fetch("cost_ratio", {}, lambda: _cost_ratio(model, calib, bench.calibration.batch_size))
            if bench.cost_ratio and bench.criteria and index == 0 else None)
    return {
        "name": bench.name, "model": bench.model.source, "seed": bench.seed,
        "calibration": {"source": bench.calibration.source.describe(), "num_samples": bench.calibration.num_samples,
                        "seq_len": bench.calibration.seq_len},
        "checksums_verified": checked, "rows": rows, "scores": results, "ppl_cost_ratio": cost,
        "total_s": round(time.perf_counter() - t_start, 1), "peak_memory_mb": peak_memory_mb(), "versions": versions(),
        "torch_threads": torch.get_num_threads(), "resumed": list(cache.reused),
    }


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
    return (f"This resumed run itself: {seconds}, peak RSS {rss}; the rows' total s add up to {rows:.0f} s (the shared width statistics "
            f"pass counted once per data-driven width row, so more than the machine time).")


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
            + " | scoring s | total s | peak RSS MB |" + (" decode speedup (bs " + "/".join(first["speed"]["decode_tok_s"]) + ") |" if speed else ""))
    lines = [head, "|" + "---|" * (8 + len(names) + 2 * len(tasks) + int(speed))]
    dense = report["rows"][0]
    for r in report["rows"]:
        # every domain's ratio to the dense row, so a number that holds only in the calibration domain shows itself
        ppl = " | ".join(f"{r['eval'][n]['ppl']:.2f} ({r['eval'][n]['ppl'] / dense['eval'][n]['ppl']:.2f}×)" for n in names)
        acc = "".join(f" | {_acc(r['eval'][n], 'acc')} | {_acc(r['eval'][n], 'acc_norm')}" for n in tasks)
        removed = r["removed_blocks"] or ("uniform widths" if r.get("uniform") else "per-layer widths" if "uniform" in r else "—")
        total = _row_total(r)
        other = r["eval"].get("torch_threads", report["torch_threads"]) != report["torch_threads"]
        lines.append(f"| {r['target']} | {r['criterion']}{' †' if other else ''} | {r['params'] / 1e6:.2f}M ({r['achieved_ratio']:.1%} cut) | "
                     f"{r['layers']} | {removed} | {ppl}{acc} | {r['score_s']:.1f} | {total:.1f} | {r.get('score_peak_rss_mb') or '—'} |"
                     + (f" {_speedup(r, dense)} |" if speed else ""))
    cal = report["calibration"]
    proto = "; ".join(first[n]["protocol"] for n in names + tasks) + (f"; speed: {first['speed']['protocol']}" if speed else "")
    paired = next((r["eval"]["speed"]["paired"] for r in report["rows"] if "paired" in r["eval"].get("speed", {})), None)
    if paired:
        proto += f"; decode speedup: {paired['protocol']}"
    lines += ["", (f"Command: `{command}`. Model `{report['model']}`, seed {report['seed']}; calibration "
              f"{cal['num_samples']} × {cal['seq_len']} tokens of `{cal['source']}`. Perplexity: {proto}. "
              f"Scoring seconds: each depth criterion alone with its own calibration pass; width criteria share one "
              f"statistics pass (hooks, plus one backward per window for Taylor), included in each data-driven one's time, "
              f"plus that row's selection, allocation and compensation solve (optimal compensation: plus its own XᵀX pass); "
              f"{_threads(report)}; peak RSS = the process's resident memory while that criterion "
              f"scored (the dense model included); total s = scoring + evaluating that row. {_totals(report)}")]
    if report.get("resumed"):
        lines += ["", (f"Resumed (`--resume`): {len(report['resumed'])} finished entries (rows, scores) came from an "
                  f"earlier run of this bench with the same settings; their seconds are that run's.")]
    c = report.get("ppl_cost_ratio")
    if c:
        lines += ["", (f"PPL-criterion cost (hidden states entering each block cached) vs one full forward per "
                  f"candidate, same calibration set, same process: **{c['cached_s']:.1f} s vs {c['naive_s']:.1f} s = "
                  f"{c['ratio']:.2f}×** (scores agree to {c['max_rel_diff']:.1e} relative).")]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, name: str, table: str) -> None:
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {start} … {end} markers to replace")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{table}{end}", text))


def _parse_shard(text: str | None, resume: bool) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not int(m[1]) < int(m[2]):
        raise ValueError(f"--shard {text}: write I/N with 0 <= I < N, e.g. --shard 0/2")
    if not resume:
        raise ValueError("--shard needs --resume: the shards share the rows folder, each reuses what the others finished")
    return int(m[1]), int(m[2])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pipeline/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--update-readme", metavar="FILE", help="replace the table between this benchmark's markers")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="reuse the rows an earlier (killed) run of this bench finished with the same settings")
    again.add_argument("--force", action="store_true", help="delete an earlier run's rows and start over")
    p.add_argument("--shard", metavar="I/N", default=None,
                   help="run only every N-th row from the I-th (0-based), keeping them under rows/ for a later "
                        "--resume run without --shard to assemble; N processes with --resume split a long bench")
    args = p.parse_args(argv)
    try:
        shard = _parse_shard(args.shard, args.resume)
    except ValueError as exc:
        p.error(str(exc))
    try:
        bench = load_bench(args.recipe)
        out = Path(bench.output_dir) / bench.name
        cache = RowCache.open(out / "rows", shared_settings(bench), args.resume, args.force)
    except (RecipeError, BenchRowsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run_bench(bench, cache, shard or (0, 1))
    if shard:
        print(f"shard {shard[0]}/{shard[1]}: {len(report['rows'])} rows kept under {out / 'rows'} "
              f"({len(cache.reused)} were already there); run without --shard, with --resume, to write the table")
        return 0
    from prunelab.rundir import atomic_write_json, atomic_write_text

    table = to_markdown(report, f"python pipeline/bench.py {args.recipe}")
    atomic_write_json(out / "bench.json", report)
    atomic_write_text(out / "bench.md", table)
    print(table)
    if args.update_readme:
        update_readme(Path(args.update_readme), bench.name, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
