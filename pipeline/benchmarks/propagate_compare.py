"""``propagate: pruned`` vs ``dense`` on a finished width run's windows and plan (issue 28): a benchmark, not a test.

    python -m prunelab.benchmarks.propagate_compare --from-run RUN --work /tmp/prop \
        [--variants dense pruned pruned-self pruned@0.1] [--out docs/results/propagate]

RUN is a finished run of a width recipe with ``compensation: optimal`` or ``bias`` (the recommended
``recipes/smollm2/optimal-comp-mix-20-q8.yaml``: 128 windows, FLAP global, optimal compensation, round_to 32). Each
variant is that recipe with the calibrate stage's ``pipeline: {type: sequential, propagate: …, target: …}`` (and
``NAME@D``: the prune stage's ``compensation.damping: D``), validated as a recipe before anything runs:

- ``dense``: ``propagate: dense`` — the statistics of ``pipeline: full``, so the plan and compensation must be the
  reference run's (checked: plan layers equal, compensation tensors' max |Δ| reported);
- ``pruned``: ``propagate: pruned`` (target dense: the dense layer's output on the dense inputs, GPTAQ's cross term);
- ``pruned-self``: ``propagate: pruned, target: self`` (the layer's own weights on the pruned-path inputs).

Why one process and a shared pass 1, instead of one ``run.py`` per variant: the calibrate stage's ``pipeline`` is part
of its settings, so the runner's chained hash re-runs calibrate, score and everything after it for every variant
(``--resume`` restores nothing past load). The windows cost nothing to rebuild (the reference run's self-generated
shards are copied into the work folder and read back from that cache: a shard is trusted only if its settings match,
and the windows are asserted equal to the reference's ``calibration.pt``), but the score pass is the same for every
variant — ``propagate: pruned`` scores and plans on the dense pass (pass 1) by design. So, as ``prunelab.prune`` does,
this script calls the stages' own ``run`` functions on one ``RunContext``: load, calibrate and score once, then per
variant the prune stage (which, with ``propagate: pruned``, walks the blocks: pass 2) on a fresh copy of the dense
model and the recipe's ``eval_pruned`` stage. Each variant's ``plan.json`` and side tensors are written into
``<work>/<variant>/``; the plan layers of every variant must be equal (the run fails otherwise).

Output: a table on stdout; ``<out>/propagate_compare.json`` (protocol, every number, seconds per stage) and
``<out>/propagate_compare.md``. Perplexity ratios are to the dense model's perplexity from the reference run's
metrics.json (``--eval-dense`` evaluates it again here). The machine is shared: the seconds are the machine's.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import set_seed
from safetensors.torch import load_file

from prunelab.context import RunContext
from prunelab.recipe import validate
from prunelab.registry import load_stages

# variant name → (calibrate pipeline settings); ``NAME@D`` adds the prune stage's compensation damping D
VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"type": "sequential", "propagate": "dense"},
    "pruned": {"type": "sequential", "propagate": "pruned", "target": "dense"},
    "pruned-self": {"type": "sequential", "propagate": "pruned", "target": "self"},
}
LABELS = {"dense": "propagate: dense", "pruned": "propagate: pruned, target: dense",
          "pruned-self": "propagate: pruned, target: self"}


class CompareError(ValueError):
    """A reference run or a variant this script cannot compare (raised before any heavy work)."""


def parse_variant(spec: str) -> tuple[str, dict[str, Any], float | None]:
    """``NAME`` or ``NAME@DAMPING`` → (name, pipeline settings, damping override or None)."""
    name, _, damping = spec.partition("@")
    if name not in VARIANTS:
        raise CompareError(f"--variants: unknown variant {spec!r}; use one of {sorted(VARIANTS)}, optionally @DAMPING "
                           "(e.g. pruned@0.1)")
    try:
        value = float(damping) if damping else None
    except ValueError:
        raise CompareError(f"--variants: {spec!r}: the damping after @ must be a number (e.g. pruned@0.1)") from None
    return name, dict(VARIANTS[name]), value


def variant_label(spec: str) -> str:
    name, _, damping = spec.partition("@")
    return LABELS[name] + (f", damping {damping}" if damping else "")


def _stage_keys(raw: dict[str, Any]) -> tuple[str, str, str, str]:
    """(calibrate, score, prune, eval_pruned) stage keys of the reference recipe: the one width chain it must hold."""
    stages = raw.get("stages", {})

    def only(kind: str, where: list[str]) -> str:
        keys = [k for k in where if stages[k].get("type") == kind]
        if len(keys) != 1:
            raise CompareError(f"the reference recipe needs exactly one {kind} stage here, found {keys or 'none'}")
        return keys[0]

    keys = list(stages)
    calibrate = only("calibrate", keys)
    prune = only("prune", keys)
    if stages[prune].get("units") != "width":
        raise CompareError(f"stages.{prune}.units: propagate: pruned re-fits width compensation; got "
                           f"{stages[prune].get('units')!r} (use a width run)")
    comp = (stages[prune].get("compensation") or {}).get("type", "none")
    if comp not in ("optimal", "bias"):
        raise CompareError(f"stages.{prune}.compensation: {comp} — propagate: pruned re-fits optimal or bias "
                           "compensation only; use a run with one of them")
    before, after = keys[: keys.index(prune)], keys[keys.index(prune) + 1 :]
    score = only("score", before)
    evals = [k for k in after if stages[k].get("type") == "evaluate"]
    if not evals:
        raise CompareError(f"the reference recipe has no evaluate stage after stages.{prune}")
    return calibrate, score, prune, evals[0]


def variant_recipe(raw: dict[str, Any], spec: str, work: Path, eval_dense: bool) -> dict[str, Any]:
    """The reference recipe cut to calibrate → score → prune → evaluate, with the variant's pipeline and damping."""
    _, pipeline, damping = parse_variant(spec)
    calibrate, score, prune, evaluate = _stage_keys(raw)
    out = copy.deepcopy(raw)
    keep = [calibrate, score, prune, evaluate]
    dense_eval = [k for k, v in raw["stages"].items() if v.get("type") == "evaluate"
                  and list(raw["stages"]).index(k) < list(raw["stages"]).index(prune)]
    if eval_dense and dense_eval:
        keep.insert(1, dense_eval[0])
    out["stages"] = {k: out["stages"][k] for k in raw["stages"] if k in keep}
    out["stages"][calibrate]["pipeline"] = {**(out["stages"][calibrate].get("pipeline") or {}), **pipeline}
    if pipeline["propagate"] == "dense":
        out["stages"][calibrate]["pipeline"].pop("target", None)
    if damping is not None:
        comp = out["stages"][prune].setdefault("compensation", {})
        if comp.get("type") != "optimal":
            raise CompareError(f"{spec}: a damping applies to compensation: optimal only")
        comp["damping"] = damping
    out["name"] = f"{raw.get('name', 'run')}-{spec.replace('@', '-d')}"
    out["output_dir"] = str(work)
    return out


def _ppl(results: dict[str, Any]) -> dict[str, float]:
    return {name: float(r["ppl"]) for name, r in results.items() if isinstance(r, dict) and "ppl" in r}


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """max |Δ| over the tensors both side files hold (None when their names differ)."""
    if a.keys() != b.keys():
        return None
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


def compare(from_run: Path, work: Path, variants: list[str], eval_dense: bool = False, progress: bool = True,
            out_dir: Path | None = None) -> dict[str, Any]:
    """Run every variant (module docstring) and return the report; writes it under ``out_dir`` after each variant."""
    raw = yaml.safe_load((from_run / "recipe.resolved.yaml").read_text())
    metrics = json.loads((from_run / "metrics.json").read_text())
    calibrate, score, prune, evaluate = _stage_keys(raw)
    for spec in variants:
        parse_variant(spec)
    recipes = {spec: validate(variant_recipe(raw, spec, work, eval_dense)) for spec in variants}  # all, before work
    folders = {k: from_run / f"{i:02d}-{k}" for i, k in enumerate(raw["stages"], start=2)}
    reference_plan = json.loads((folders[prune] / "plan.json").read_text())
    reference_side_file = folders[prune] / "compensation.safetensors"
    reference_side = load_file(str(reference_side_file)) if reference_side_file.exists() else {}
    reference_windows = torch.load(folders[calibrate] / "calibration.pt", weights_only=True)

    shared = work / "shared"
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir(parents=True)
    if (folders[calibrate] / "generated").is_dir():  # self-generated shards: read back, not sampled again
        shutil.copytree(folders[calibrate] / "generated", shared / f"02-{calibrate}" / "generated")

    PartialState()
    specs = load_stages()
    first = recipes[variants[0]]
    ctx = RunContext(recipe=first, run_dir=shared, accelerator=None, progress=progress)
    seconds: dict[str, float] = {}

    def stage(key: str, stage_type: str, cfg: Any, folder: Path) -> Any:
        ctx.stage_key, ctx.stage_dir = key, folder
        folder.mkdir(parents=True, exist_ok=True)
        set_seed(ctx.recipe.seed)  # as the runner does before every stage
        t0 = time.perf_counter()
        out = specs.get(stage_type).run(ctx, cfg)
        return out, time.perf_counter() - t0

    _, seconds["load"] = stage("load", "load", first.model, shared / "01-load")
    _, seconds["calibrate"] = stage(calibrate, "calibrate", first.stages[calibrate], shared / f"02-{calibrate}")
    if not torch.equal(ctx.calibration, reference_windows):
        raise CompareError(f"the rebuilt calibration windows differ from {folders[calibrate] / 'calibration.pt'} "
                           "(a changed data file or generation setting); the comparison would not be on its windows")
    dense_ppl = _ppl(metrics.get("eval", {}).get("dense", {}))
    if eval_dense:
        key = next(k for k in first.stages if first.stages[k].type == "evaluate")
        _, seconds["eval_dense"] = stage(key, "evaluate", first.stages[key], shared / f"03-{key}")
        dense_ppl = _ppl(ctx.evals["dense"])
    _, seconds["score"] = stage(score, "score", first.stages[score], shared / f"04-{score}")
    pristine = ctx.model
    report: dict[str, Any] = {
        "reference_run": str(from_run), "recipe": raw.get("name"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.processor() or
        platform.machine(), "torch_threads": torch.get_num_threads(),
        "protocol": _protocol(raw, calibrate, prune, metrics, eval_dense),
        "dense": dense_ppl, "reference": {"label": "pipeline: full (the reference run, not re-run)",
                                          "ppl": _ppl(metrics.get("eval", {}).get("pruned", {}))},
        "shared_seconds": seconds, "variants": {},
    }
    plans: dict[str, Any] = {}
    for spec in variants:
        recipe = recipes[spec]
        ctx.recipe, ctx.model, ctx.state, ctx.plan, ctx.evals = recipe, copy.deepcopy(pristine), "dense", None, {}
        folder = work / spec.replace("@", "-d")
        shutil.rmtree(folder, ignore_errors=True)
        _, prune_s = stage(prune, "prune", recipe.stages[prune], folder / f"05-{prune}")
        plan = json.loads((folder / f"05-{prune}" / "plan.json").read_text())
        plans[spec] = plan["layers"]
        side_file = folder / f"05-{prune}" / "compensation.safetensors"
        side = load_file(str(side_file)) if side_file.exists() else {}
        _, eval_s = stage(evaluate, "evaluate", recipe.stages[evaluate], folder / f"06-{evaluate}")
        ppl = _ppl(ctx.evals["pruned"])
        report["variants"][spec] = {
            "label": variant_label(spec), "pipeline": recipe.stages[calibrate].pipeline.model_dump(mode="json"),
            "compensation": recipe.stages[prune].compensation.model_dump(mode="json"), "ppl": ppl,
            "ratio_to_dense": {k: v / dense_ppl[k] for k, v in ppl.items() if k in dense_ppl},
            "plan_equals_reference": plan["layers"] == reference_plan["layers"],
            "side_max_abs_diff_to_reference": _max_diff(side, reference_side),
            "params_after": plan.get("params_after"),
            "seconds": {"prune": prune_s, "evaluate": eval_s},
        }
        ctx.model = None
        if out_dir is not None:
            write(report, out_dir)
    names = list(plans)
    if any(plans[n] != plans[names[0]] for n in names):
        raise CompareError(f"the variants' plans differ ({names}): propagate: pruned must keep the dense plan")
    report["plans_identical"] = True
    if out_dir is not None:
        write(report, out_dir)
    return report


def _protocol(raw: dict[str, Any], calibrate: str, prune: str, metrics: dict[str, Any], eval_dense: bool) -> str:
    cal, pr = raw["stages"][calibrate], raw["stages"][prune]
    evals = metrics.get("eval", {}).get("pruned", {})
    texts = "; ".join(f"{k}: {v.get('protocol', '')}" for k, v in evals.items() if isinstance(v, dict))
    return (f"recipe {raw.get('name')} (seed {raw.get('seed')}): calibration {cal.get('num_samples')} × "
            f"{cal.get('seq_len')} tokens (the reference run's windows, asserted equal), calibrate pipeline "
            f"sequential; score pass shared by every variant (pass 1 is the dense pass for propagate: pruned too); "
            f"prune {pr.get('criterion')} {pr.get('ratio')} allocation {(pr.get('allocation') or {}).get('type')}, "
            f"compensation {pr.get('compensation')}, round_to {pr.get('round_to')}; evaluation: {texts}; dense "
            f"perplexity {'evaluated here' if eval_dense else 'from the reference run metrics.json'}")


def table(report: dict[str, Any]) -> str:
    """The markdown table: perplexity and ratio to dense per dataset, seconds of the prune stage and evaluation."""
    datasets = list(report["dense"])
    head = "| variant | " + " | ".join(f"{d} ppl (× dense)" for d in datasets) + " | prune s | eval s |"
    rows = [head, "|" + "---|" * (len(datasets) + 3)]

    def cells(ppl: dict[str, float]) -> str:
        dense = report["dense"]
        return " | ".join(f"{ppl[d]:.2f} ({ppl[d] / dense[d]:.3f}×)" if d in ppl else "–" for d in datasets)

    rows.append("| dense model | " + " | ".join(f"{report['dense'][d]:.2f}" for d in datasets) + " | – | – |")
    if report["reference"]["ppl"]:
        rows.append(f"| {report['reference']['label']} | {cells(report['reference']['ppl'])} | – | – |")
    for v in report["variants"].values():
        s = v["seconds"]
        rows.append(f"| {v['label']} | {cells(v['ppl'])} | {s['prune']:.0f} | {s['evaluate']:.0f} |")
    return "\n".join(rows)


def write(report: dict[str, Any], out_dir: Path) -> None:
    """``propagate_compare.json`` (everything) and ``propagate_compare.md`` (protocol + table) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "propagate_compare.json").write_text(json.dumps(report, indent=2) + "\n")
    shared = ", ".join(f"{k} {v:.0f} s" for k, v in report["shared_seconds"].items())
    checks = [f"- {v['label']}: plan layers equal to the reference run's: {v['plan_equals_reference']}; compensation "
              f"tensors' max |Δ| to the reference run's: {v['side_max_abs_diff_to_reference']}"
              for v in report["variants"].values()]
    md = (f"# propagate: pruned vs dense ({report['recipe']})\n\n{report['date']}, {report['machine']}, "
          f"{report['torch_threads']} torch thread(s). Protocol: {report['protocol']}.\nShared stages: {shared}.\n\n"
          f"{table(report)}\n\n" + "\n".join(checks) + "\n")
    (out_dir / "propagate_compare.md").write_text(md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from-run", type=Path, required=True, help="a finished width run (recipe.resolved.yaml, "
                        "metrics.json, its calibrate and prune folders)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the variants' stage outputs")
    parser.add_argument("--variants", nargs="+", default=["dense", "pruned", "pruned-self"],
                        help="dense | pruned | pruned-self, each optionally @DAMPING (e.g. pruned@0.1)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/propagate"))
    parser.add_argument("--eval-dense", action="store_true", help="evaluate the dense model here too")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = compare(args.from_run, args.work, args.variants, args.eval_dense, not args.no_progress, args.out)
    except CompareError as exc:
        print(f"error: {exc}")
        return 2
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
