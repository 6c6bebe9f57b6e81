"""prunelab's entry point: ``python pipeline/run.py RECIPE [key.path=value ...]``.

Works the same under ``accelerate launch pipeline/run.py ...``. The recipe is validated (schema,
files, targets) before anything heavy is imported, so bad input fails in well under two seconds.
A failure later never ends in a traceback: one paragraph names the stage, the input and the fix (exit 2 for a
user's mistake, 1 for an internal error, 130 for Ctrl-C); the traceback and every log line are in
``<run dir>/run.log`` (pipeline.runlog), and the finished stages stay for ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project root importable, not pipeline/
    _root = str(Path(__file__).resolve().parents[1])
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _root
    elif _root not in sys.path:
        sys.path.insert(0, _root)

from prunelab.preflight import footprint, preflight
from prunelab.recipe import RecipeBase, RecipeError, load_recipe
from prunelab.rundir import describe_force
from prunelab.runlog import RunLog, failure_message, quiet_progress, validation_crash
from prunelab.runner import execute
from prunelab.stages.evaluation.describe import describe_result
from prunelab.stages.surgery.plan import read_plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pipeline/run.py",
        description="Run a prunelab recipe: load → calibrate → score → prune → (recover) → evaluate → export.",
        epilog="Overrides use OmegaConf dot paths, e.g. stages.prune.num_blocks=8 model.dtype=bfloat16",
    )
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/smollm2/shortgpt-6blocks.yaml")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides merged over the recipe")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe, its files and its targets against the model's metadata; print the stages; load nothing")
    p.add_argument("--resume", action="store_true", help="continue an existing run, re-using finished stages")
    p.add_argument("--force", action="store_true", help="delete an existing run directory and start over")
    p.add_argument("--output-dir", help="parent folder of the run directory (overrides the recipe's output_dir)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    args = p.parse_intermixed_args(argv)
    if args.resume and args.force:
        p.error("--resume and --force contradict each other; choose one")
    return args


def describe(recipe: RecipeBase, run_dir: Path, facts: dict[str, Any] | None = None) -> str:
    """What --dry-run prints: the run directory, the model as its metadata describes it, and every
    stage folder with its resolved settings (defaults filled in), one line each, in the order they run."""
    lines = [f"recipe {recipe.name!r} (seed {recipe.seed}) → {run_dir}"]
    if run_dir.exists():
        lines.append("  (run directory exists: a real run needs --resume to continue it or --force to start over)")
    known = {k: v for k, v in (facts or {}).items() if v is not None}
    if known:
        sizes = [f"{known['num_layers']} blocks" if "num_layers" in known else "",
                 f"{known['total_params']:,} parameters ({known['block_params']:,} per block)" if "total_params" in known else "",
                 f"context {known['max_positions']} tokens" if "max_positions" in known else ""]
        lines.append(f"model {recipe.model.source} (from its metadata): " + ", ".join(x for x in sizes if x))
    else:
        lines.append(f"model {recipe.model.source}: no local metadata yet; block targets are checked once it loads")
    lines.append("stages (folder: settings):")
    lines.append("  01-load: " + json.dumps(recipe.model.model_dump(mode="json", exclude_none=True)))
    for i, (key, cfg) in enumerate(recipe.stages.items(), start=2):
        lines.append(f"  {i:02d}-{key}: " + json.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"output_dir={args.output_dir}")
        recipe = load_recipe(args.recipe, overrides)
        facts = preflight(recipe, probe_hub=True)  # a hub id or dataset not cached: refused offline in ~1 s
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 (a check that crashed: a bug, said as one paragraph, not a traceback)
        print(validation_crash(exc, args.recipe), file=sys.stderr)
        return 1
    run_dir = recipe.run_dir
    if args.dry_run:
        print(describe(recipe, run_dir, facts))
        print("\n".join(footprint(recipe)))  # the download and the memory the recipe needs (docs/data.md)
        if args.force:  # what --force would delete, or why it would refuse (pipeline.rundir)
            print(describe_force(run_dir) or f"--force: {run_dir} does not exist; nothing would be deleted")
        print("recipe is valid (dry run: nothing loaded); run it without --dry-run")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    tty = sys.stderr.isatty()  # redirected to a file, a bar's carriage returns would make one endless line
    with RunLog(run_dir, resume=args.resume) as runlog, quiet_progress(not tty):
        try:
            metrics = execute(recipe, run_dir, resume=args.resume, force=args.force,
                              progress=not args.no_progress and tty)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 (every failure becomes one paragraph and a log)
            code, message = failure_message(exc, args.recipe, run_dir, runlog.write_traceback(exc))
            print(message, file=sys.stderr)
            return code
    if metrics is not None:
        print(summary(metrics, run_dir))
    return 0


def summary(metrics: dict[str, Any], run_dir: Path) -> str:
    """The one-screen summary printed at the end of a run."""
    m = metrics["model"]
    lines = [
        "",
        f"== {metrics['recipe']} → {run_dir}",
        f"params {m['params_before']:,} → {m['params_after']:,}   blocks {m['layers_before']} → {m['layers_after']}",
    ]
    plan = read_plan(run_dir)
    if plan is not None:
        lines.append(plan.describe())
    for label, results in metrics["eval"].items():
        for name, r in results.items():
            ratio = metrics.get("ratio_to_dense", {}).get(label, {}).get(name)
            lines.append(f"{label:>9} {name}: {describe_result(r)}" + (f"  {ratio:.2f}× dense" if ratio else ""))
    for label, r in metrics.get("recover", {}).items():
        if r.get("recovery_worse_than_pruned"):
            lines.append(f"WARNING recover {label}: the recovered model is WORSE than the pruned one on "
                         f"{', '.join(r.get('worse_on', {})) or 'perplexity'}; this is not a recovery (see metrics.json)")
        lines.append(f"recover {label}: {r['steps']} steps, loss {r['first_loss']:.3f} → {r['final_loss']:.3f}, "
                     f"{r['tokens_per_s']} tokens/s" + (f" ({r['tokens_per_s_ratio_vs_plain']:.2f}× a plain peft loop)"
                                                        if "tokens_per_s_ratio_vs_plain" in r else ""))
    lines.append("timing " + ", ".join(f"{k} {v:.1f}s" for k, v in metrics["timing_s"].items() if v))
    lines.append(f"metrics: {run_dir / 'metrics.json'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
