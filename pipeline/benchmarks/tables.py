"""The other shipped benches as rows of recipes: calibration sources, recovery, a calibration draw, plain rows.

Each short form is a :class:`StrictModel` (an unknown key or a missing base is named before anything runs) compiled
into a :class:`~prunelab.benchmarks.spec.Bench`; the executor runs the rows through the runner like any other
bench, and :func:`assemble` turns the rows' ``metrics.json`` into the table that bench was written for:

- calibration (``recipes/bench/smollm2-calibration.yaml``): each method's recipe re-run with every calibration
  source, its evaluate / export / recover stages replaced by one shared evaluation (pruning only);
- recovery (``recipes/bench/smollm2-recovery.yaml``): one pruned model per base, healed by each row's recovery
  (``recover`` merged over the shared block), or reached in ``iterate`` cycles of the same total steps;
- select_draw (``prunelab bench --draw RECIPE --seeds 0-7``): a recipe run with K seeds, each pruned model scored on
  held-out *validation* text, the best draw named with every draw's test number beside it;
- rows (the native form): each row's params and perplexities with their ratio to a dense row.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from prunelab.benchmarks.spec import BenchError, merge, recipe_dict
from prunelab.recipe import StrictModel

__all__ = ["assemble", "compile_calibration", "compile_recovery", "compile_select_draw", "parse_seeds"]

HOLDOUT = "../shared/data/wikitext2/valid.txt"


def _checked(model: type[StrictModel], raw: dict[str, Any]) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors()]
        raise BenchError("the bench spec is not valid:\n  - " + "\n  - ".join(lines)) from None


class Method(StrictModel):
    """A base recipe, and keys that replace its prune stage's (None drops a key)."""

    recipe: str
    prune: dict[str, Any] = Field(default_factory=dict)

    def load(self) -> dict[str, Any]:
        base = recipe_dict(self.recipe)
        for key, cfg in base["stages"].items():
            if cfg["type"] == "prune" and self.prune:
                base["stages"][key] = merge(cfg, self.prune)
        return base


def _methods(raw: Any) -> Any:
    return {k: {"recipe": v} if isinstance(v, str) else v for k, v in raw.items()} if isinstance(raw, dict) else raw


def _dense(base: dict[str, Any], evaluation: dict[str, Any] | None) -> dict[str, Any]:
    return {"seed": base.get("seed", 0), "model": base["model"],
            "stages": {"eval": {"type": "evaluate", **(evaluation or {}), "label": "dense"}}}


# ----------------------------------------------------------------------------- calibration sources
class CalibrationSpec(StrictModel):
    name: str | None = None
    output_dir: str = "bench-out"
    methods: dict[str, Method] = Field(..., min_length=1)
    calibrations: dict[str, dict[str, Any]] = Field(..., min_length=1, description="label → a calibrate stage's source")
    evaluation: dict[str, Any] = Field(..., description="an evaluate stage's settings, the same for every row")

    @model_validator(mode="before")
    @classmethod
    def _short(cls, raw: Any) -> Any:
        return {**raw, "methods": _methods(raw.get("methods"))} if isinstance(raw, dict) else raw


def compile_calibration(raw: dict[str, Any], stem: str = "calibration") -> dict[str, Any]:
    """Rows: the dense model, then every (method, calibration source) pair, pruning only."""
    spec = _checked(CalibrationSpec, raw)
    bases = {m: entry.load() for m, entry in spec.methods.items()}
    rows = [{"name": "dense", "recipe": _dense(next(iter(bases.values())), spec.evaluation), "meta": {"dense": True}}]
    for method, base in bases.items():
        for label, source in spec.calibrations.items():
            stages: dict[str, Any] = {}
            for key, cfg in base["stages"].items():
                if cfg["type"] in ("evaluate", "export", "recover"):
                    continue
                stages[key] = {**cfg, "source": source} if cfg["type"] == "calibrate" else cfg
            stages["eval"] = {"type": "evaluate", **spec.evaluation}
            rows.append({"name": f"{method}--{label}", "recipe": {**base, "stages": stages},
                         "meta": {"method": method, "calibration": label}})
    return {"name": spec.name or stem, "kind": "calibration", "output_dir": spec.output_dir, "rows": rows}


# ----------------------------------------------------------------------------- recovery
class RecoveryRow(StrictModel):
    dense: bool = False
    base: str | None = None
    recover: dict[str, Any] | None = None
    iterate: dict[str, int] | None = Field(None, description="{cycles: n}: the base's target in n prune → recover cycles")

    @model_validator(mode="after")
    def _shape(self) -> RecoveryRow:
        if not self.dense and self.base is None:
            raise ValueError("a row is {dense: true} or names its `base`")
        if self.iterate is not None and (self.recover is None or set(self.iterate) != {"cycles"}):
            raise ValueError("iterate: write {cycles: n} beside a recover block (every cycle heals)")
        return self


class RecoverySpec(StrictModel):
    name: str | None = None
    output_dir: str = "bench-out"
    bases: dict[str, Method] = Field(..., min_length=1)
    recover: dict[str, Any] = Field(default_factory=dict, description="the recover stage every recovered row merges over")
    evaluation: dict[str, Any] | None = None
    rows: dict[str, RecoveryRow] = Field(..., min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _short(cls, raw: Any) -> Any:
        return {**raw, "bases": _methods(raw.get("bases"))} if isinstance(raw, dict) else raw

    @model_validator(mode="after")
    def _bases_and_dense(self) -> RecoverySpec:
        bad = {n: r.base for n, r in self.rows.items() if r.base is not None and r.base not in self.bases}
        if bad:
            raise ValueError(f"rows {sorted(bad)}: base must be one of {sorted(self.bases)}")
        if not any(r.dense for r in self.rows.values()):
            raise ValueError("the spec needs a row {dense: true}: every ratio is to the dense model")
        return self


def _iterate(prune: dict[str, Any], stages: dict[str, Any], cycles: int, rec: dict[str, Any]) -> dict[str, Any]:
    """An iterate stage reaching ``prune``'s target in ``cycles``, the recovery's steps split evenly over them."""
    rec = merge(rec, {"loop": {"max_steps": rec.get("loop", {}).get("max_steps", 0) // cycles}})
    rec.pop("control", None)
    score = next((c for c in stages.values() if c["type"] == "score"), {})
    return {"type": "iterate", "cycles": cycles, "prune": {k: v for k, v in prune.items() if k != "type"}, "recover": rec,
            **({"settings": score["settings"]} if score.get("settings") else {}),
            **({"batch_size": score["batch_size"]} if score.get("batch_size") else {})}


def recovery_recipe(row: RecoveryRow, bases: dict[str, dict[str, Any]], spec: RecoverySpec) -> dict[str, Any]:
    """The recipe one row runs: the base's pruning stages, then its recovery (or cycles), then the evaluation."""
    if row.dense:
        return _dense(next(iter(bases.values())), spec.evaluation)
    base = copy.deepcopy(bases[str(row.base)])
    rec = merge(spec.recover, row.recover) if row.recover is not None else None
    stages: dict[str, Any] = {}
    for key, cfg in base["stages"].items():
        if cfg["type"] in ("evaluate", "export", "recover") or (cfg["type"] == "score" and row.iterate):
            continue
        if cfg["type"] == "prune" and row.iterate and rec is not None:
            stages["iterate"] = _iterate(cfg, base["stages"], row.iterate["cycles"], rec)
            continue
        stages[key] = cfg
    if rec is not None and not row.iterate:
        stages["recover"] = {"type": "recover", **rec}
    stages["eval"] = {"type": "evaluate", **(spec.evaluation or {})}
    return {**base, "stages": stages}


def compile_recovery(raw: dict[str, Any], stem: str = "recovery") -> dict[str, Any]:
    spec = _checked(RecoverySpec, raw)
    bases = {b: entry.load() for b, entry in spec.bases.items()}
    rows = [{"name": n, "recipe": recovery_recipe(r, bases, spec), "meta": {"dense": r.dense}}
            for n, r in spec.rows.items()]
    return {"name": spec.name or stem, "kind": "recovery", "output_dir": spec.output_dir, "rows": rows}


# ----------------------------------------------------------------------------- a calibration draw
def parse_seeds(text: str) -> list[int]:
    """``"0-7"`` → 0…7; ``"1,5,42"`` → those; a mix of both is allowed."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi < lo:
                raise BenchError(f"--seeds: range {part!r} runs backwards")
            seeds += range(lo, hi + 1)
        elif part:
            seeds.append(int(part))
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise BenchError(f"--seeds: give at least two distinct seeds (got {text!r})")
    return seeds


def compile_select_draw(recipe_path: str, seeds: list[int], holdout: str = HOLDOUT, holdout_tokens: int = 30720,
                        seq_len: int = 512, output_dir: str = "bench-out") -> dict[str, Any]:
    """One row per seed: the recipe up to pruning as written, then the held-out (selection) and its own last
    (reported) evaluations. Picking the draw is model selection, so it is done on validation text, never test.

    A one-shot criterion fed a few hundred calibration tokens (LLM-Pruner's 10 × 64) gives a plan that depends on
    the draw: on SmolLM2 the official configuration spans 93.8–104.1 WikiText-2 test perplexity over three draws
    (docs/llm-pruner-parity.md). The held-out text may share a few lines with the calibration windows."""
    if "test" in Path(holdout).name:
        raise BenchError(f"--holdout {holdout!r} looks like a test split: select on validation text")
    if not Path(holdout).is_file():
        raise BenchError(f"--holdout: file {holdout!r} not found")
    base = recipe_dict(recipe_path)
    stages = base["stages"]
    if not any(c["type"] == "calibrate" for c in stages.values()):
        raise BenchError("the recipe has no calibrate stage: there is no calibration draw to choose")
    if any(c["type"] in ("recover", "iterate") for c in stages.values()):
        raise BenchError("a draw is chosen for a one-shot plan: drop the recover / iterate stages from the recipe")
    evals = [c for c in stages.values() if c["type"] == "evaluate"]
    reported = copy.deepcopy(evals[-1]) if evals else {"type": "evaluate"}
    reported.pop("label", None)  # both evaluations land under the pruned model's label, side by side
    if "holdout" in (reported.get("perplexity") or {}):
        raise BenchError("the recipe's evaluation already has a dataset named 'holdout': rename it")
    kept = {k: c for k, c in stages.items() if c["type"] not in ("evaluate", "export")}
    held = {"source": {"path": holdout}, "seq_len": seq_len, "max_tokens": holdout_tokens}
    rows = [{"name": f"{base['name']}--seed{s}", "meta": {"seed": s},
             "recipe": {**base, "seed": s, "stages": {**kept, "holdout": {"type": "evaluate", "perplexity": {"holdout": held}},
                                                      "eval": reported}}} for s in seeds]
    return {"name": f"{base['name']}--select-draw", "kind": "select_draw", "output_dir": output_dir, "rows": rows,
            "info": {"recipe": recipe_path, "holdout": held}}


# ----------------------------------------------------------------------------- tables
def _ppl(evals: dict[str, Any]) -> dict[str, float]:
    return {d: v["ppl"] for d, v in evals.items() if isinstance(v, dict) and "ppl" in v}


def _ratio_table(rows: list[dict[str, Any]], first: list[str]) -> str:
    domains = list(rows[0]["ppl"]) if rows else []
    head = "| " + " | ".join(first) + " | params | " + " | ".join(f"{d} PPL (× dense)" for d in domains) + " |"
    lines = [head, "|" + "---|" * (len(first) + 1 + len(domains))]
    for r in rows:
        cells = [f"{r['ppl'][d]:.2f} ({r['ratio'].get(d, float('nan')):.2f}×)" if d in r["ppl"] else "–" for d in domains]
        lines.append("| " + " | ".join(str(r[k]) for k in first) + f" | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recovery_lines(name: str, m: dict[str, Any], dense: dict[str, float]) -> list[dict[str, Any]]:
    """A finished recovery row's table lines: its last label (dense / pruned / recovered) and, if any, its control."""
    evals = m["eval"]
    label = next(lb for lb in ("recovered", "pruned", "dense") if lb in evals)
    out = []
    for row_name, lb in [(name, label)] + ([(f"{name} → dense control", "control")] if "control" in evals else []):
        ev, rec = evals[lb], m.get("recover", {}).get("pruned" if lb == "recovered" else lb, {})
        out.append({"row": row_name, "label": lb,
                    "params": m["model"]["params_after"] if lb in ("pruned", "recovered") else m["model"]["params_before"],
                    "ppl": _ppl(ev), "ratio": {d: p / dense[d] for d, p in _ppl(ev).items() if d in dense},
                    "tasks": {d: {k: v.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
                              for d, v in ev.items() if isinstance(v, dict) and "acc" in v},
                    "steps": rec.get("steps"), "tokens_per_step": rec.get("tokens_per_step"),
                    "tokens_per_s": rec.get("tokens_per_s"),
                    "tokens_per_s_without_teacher": (rec.get("teacher") or {}).get("tokens_per_s_without_teacher"),
                    "recover_s": rec.get("seconds"), "final_loss": rec.get("final_loss")})
    return out


def recovery_table(rows: list[dict[str, Any]]) -> str:
    domains = list(rows[0]["ppl"]) if rows else []
    tasks = sorted({t for r in rows for t in r["tasks"]})
    head = ["row", "params"] + [f"{d} PPL (× dense)" for d in domains] + [f"{t} acc / acc_norm" for t in tasks]
    head += ["steps × tokens", "tokens/s (w/o teacher fwd)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["row"], f"{r['params'] / 1e6:.1f}M"]
        cells += [f"{r['ppl'][d]:.2f} ({r['ratio'].get(d, float('nan')):.2f}×)" if d in r["ppl"] else "–" for d in domains]
        for t in tasks:
            a = r["tasks"].get(t)
            cells.append(f"{100 * a['acc']:.1f} ± {100 * (a['acc_stderr'] or 0):.1f} / {100 * a['acc_norm']:.1f}" if a else "–")
        cells.append(f"{r['steps']} × {r['tokens_per_step']}" if r["steps"] else "–")
        speed, nt = r["tokens_per_s"], r["tokens_per_s_without_teacher"]
        cells.append(f"{speed}" + (f" ({nt})" if nt else "") if speed else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_table(lines: list[dict[str, Any]], best: int) -> str:
    domains = list(lines[0]["reported"])
    head = ["seed", "params", "held-out valid PPL (selection)"] + [f"{d} PPL (reported)" for d in domains]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in lines:
        mark = " **← chosen**" if r["seed"] == best else ""
        out.append(f"| {r['seed']}{mark} | {r['params']:,} | {r['holdout']:.2f} | "
                   + " | ".join(f"{r['reported'][d]:.2f}" for d in domains) + " |")
    for d in domains:
        vals = [r["reported"][d] for r in lines]
        out.append(f"\n{d}: median over draws {statistics.median(vals):.2f}, range {min(vals):.2f}–{max(vals):.2f}")
    return "\n".join(out)


def _dense_row(bench: Any, finished: dict[str, Any]) -> dict[str, Any] | None:
    return next((finished[r.name] for r in bench.rows if r.meta.get("dense") and finished.get(r.name)), None)


def _protocol(dense: dict[str, Any] | None) -> dict[str, str]:
    evals = dense["eval"]["dense"] if dense else {}
    return {d: v["protocol"] for d, v in evals.items() if isinstance(v, dict) and "protocol" in v}


def assemble(bench: Any, finished: dict[str, Any], command: str) -> tuple[dict[str, Any], str]:
    """The JSON and Markdown of a calibration, recovery, select-draw or plain-rows bench from its finished rows."""
    done = [(r, finished[r.name]) for r in bench.rows if finished.get(r.name) is not None]
    protocol_lines = ""
    if bench.kind == "select_draw":
        lines = [{"seed": r.meta["seed"], "params": m["model"]["params_after"], "holdout": m["eval"]["pruned"]["holdout"]["ppl"],
                  "reported": {d: p for d, p in _ppl(m["eval"]["pruned"]).items() if d != "holdout"}} for r, m in done]
        best = min(lines, key=lambda x: x["holdout"])["seed"]
        data = {**bench.info, "chosen_seed": best, "draws": lines}
        text = draw_table(lines, best) + (f"\n\nchosen: seed {best} (lowest held-out perplexity); set `seed: {best}` "
                                          f"in {bench.info['recipe']}")
        return data, f"{text}\n\nCommand: `{command}`.\n"
    dense_m = _dense_row(bench, finished)
    if dense_m is None:
        raise BenchError(f"no finished dense row under {bench.rows_dir}: every ratio is to the dense model")
    dense = _ppl(dense_m["eval"]["dense"])
    protocol = _protocol(dense_m)
    if bench.kind == "recovery":
        rows = [line for r, m in done for line in recovery_lines(r.name, m, dense)]
        table = recovery_table(rows)
    else:
        rows = []
        for r, m in done:
            label = "dense" if r.meta.get("dense") else next(lb for lb in ("recovered", "pruned", "dense") if lb in m["eval"])
            ppl = _ppl(m["eval"][label])
            key = "params_before" if label == "dense" else "params_after"
            head = ({"method": r.meta.get("method", "dense"), "calibration": r.meta.get("calibration", "-")}
                    if bench.kind == "calibration" else {"row": r.name})
            rows.append({**head, "params": m["model"][key], "ppl": ppl,
                         "ratio": {d: p / dense[d] for d, p in ppl.items() if d in dense}})
        table = _ratio_table(rows, ["method", "calibration"] if bench.kind == "calibration" else ["row"])
    protocol_lines = "\n".join(f"- {d}: {t}" for d, t in protocol.items())
    data = {"spec": bench.model_dump(mode="json"), "protocol": protocol, "rows": rows}
    return data, f"{table}\n\n{protocol_lines}\n\nCommand: `{command}`.\n"
