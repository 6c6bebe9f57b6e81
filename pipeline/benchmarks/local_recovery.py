"""Block-local reconstruction vs global LoRA distillation at equal wall-clock time (issue 28): a benchmark, not a test.

    python -m prunelab.benchmarks.local_recovery --from-run RUN --work /tmp/lr \
        [--variants pruned reconstruct kd reconstruct+kd] [--reconstruct KEY=VALUE ...] [--kd-steps N] \
        [--max-tokens N] [--out docs/results/local-recovery]

RUN is a finished run of a width recipe (the recommended ``recipes/smollm2/optimal-comp-mix-20-q8.yaml``: FLAP
global + optimal compensation, 128 mix windows) with its ``metrics.json`` and ``recipe.resolved.yaml``. Every variant
is that run's recipe up to its first evaluate stage after the prune, then the variant's stages, then ``eval_recovered``
(the run's own perplexity suite, or its first ``--max-tokens`` tokens of each set; no task accuracy), run as a
``python pipeline/run.py … --resume`` child in ``<work>/<variant>/``, a hard-linked copy of RUN: the runner's chained
hashes restore load, calibrate, score, prune and the evaluations (checked: the child's log must say ``restored`` for
the prune stage, so nothing upstream is recomputed). A finished variant folder is simply restored again (re-running
the script only collects).

- ``pruned``: no recovery (optimal compensation is the pruned model's own closed-form correction) — the run's numbers;
- ``reconstruct``: the ``reconstruct`` stage with ``BEST`` below (``--reconstruct KEY=VALUE`` overrides a setting);
- ``kd``: the recover stage's LoRA distillation from the dense model as in docs/results.md's two-domain table
  (``flap-optimal--lora-kd``: r 8, α 16, loss kd, lr 3e-3, 4 × 256-token sequences per step of WikiText-2 valid;
  ``KD`` below says why not the teacher-generated row), with ``--kd-steps`` steps; by default as many steps as fit
  in the reconstruction's wall-clock: a 3-step probe run measures the median seconds per step and the fixed cost
  (setup), then steps = (reconstruct seconds − fixed) / median;
- ``reconstruct+kd``: the reconstruction, then the same KD for a quarter of those steps.

Output: a table on stdout; ``<out>/local_recovery.json`` (protocol, every number, the stages' seconds) and
``<out>/local_recovery.md``. Ratios are to the dense model's perplexity on the same tokens (the run's ``eval_dense``
for the full protocol; a ``dense`` child for a cut one). The machine is shared: seconds are the machine's at the time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from prunelab.recipe import RecipeError, load_recipe
from prunelab.registry import load_stages

ROOT = Path(__file__).resolve().parents[2]

# the reconstruction settings measured best (docs/recovery.md, "Block-local reconstruction")
BEST: dict[str, Any] = {"type": "reconstruct", "inputs": "pruned", "train": "weights", "sublayers": "together",
                        "num_windows": 64, "steps": 16, "batch_size": 8, "lr": 3.0e-4, "loss": "fisher"}
# docs/results.md, "Results: recovery on two domains", row flap-optimal--lora-kd: LoRA distillation on WikiText-2
# valid. The best row (-mix--lora-kd-generated) adds 256 teacher-generated texts, but generating them is a fixed cost
# of its own (measured here: one of 8 batches in 15 min at load 10 on 2 cores), larger than the whole reconstruction;
# add them back with --kd data.teacher_generate='{num_samples: 256, prompt_tokens: 32, batch_size: 32}'
KD: dict[str, Any] = {"type": "recover", "method": "lora", "loss": "kd",
                      "data": {"source": {"path": "../shared/data/wikitext2/valid.txt"}, "format": "text",
                               "seq_len": 256},
                      "lora": {"rank": 8, "alpha": 16, "dropout": 0.05},
                      "optimizer": {"lr": 3.0e-3, "warmup_steps": 10},
                      "loop": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 100}}
VARIANTS = ("pruned", "reconstruct", "kd", "reconstruct+kd")
PROBE_STEPS = 3


class BenchError(ValueError):
    """A run or a setting this script cannot use (raised before any child starts)."""


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (VALUE read as YAML: ``lr=3e-4`` → 0.0003, ``sublayers=separate`` → 'separate')."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise BenchError(f"--reconstruct {text!r}: write KEY=VALUE, e.g. --reconstruct lr=1e-3 loss=token")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key, parsed


def reference(run: Path) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(resolved recipe, metrics, the stage keys kept: up to the first evaluate stage after the width prune)."""
    for name in ("recipe.resolved.yaml", "metrics.json"):
        if not (run / name).is_file():
            raise BenchError(f"--from-run {run}: no {name}; pass the folder of a finished run")
    raw = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    keys = list(raw["stages"])
    prunes = [k for k in keys if raw["stages"][k]["type"] == "prune"]
    if len(prunes) != 1 or raw["stages"][prunes[0]].get("units") != "width":
        raise BenchError(f"--from-run {run}: needs exactly one width prune stage (block-local reconstruction pairs "
                         f"block i with dense block i); found {prunes or 'none'}")
    after = keys[keys.index(prunes[0]) + 1:]
    evals = [k for k in after if raw["stages"][k]["type"] == "evaluate"]
    if not evals:
        raise BenchError(f"--from-run {run}: no evaluate stage after stages.{prunes[0]}")
    if "pruned" not in metrics.get("eval", {}) or "dense" not in metrics.get("eval", {}):
        raise BenchError(f"--from-run {run}: metrics.json lacks the dense or pruned evaluation; let the run finish")
    return raw, metrics, keys[: keys.index(evals[0]) + 1]


def eval_stage(raw: dict[str, Any], key: str, max_tokens: int | None) -> dict[str, Any]:
    """The reference evaluate stage's perplexity sets (cut to ``max_tokens`` each), no tasks, no speed."""
    stage = copy.deepcopy(raw["stages"][key])
    sets = stage.get("perplexity") or {}
    if not sets:
        raise BenchError(f"stages.{key}: the reference evaluate stage has no perplexity sets to compare on")
    if max_tokens is not None:
        for s in sets.values():
            s["max_tokens"] = max_tokens
    return {"type": "evaluate", "label": None, "perplexity": sets, "tasks": {}, "speed": None}


def variant_recipe(raw: dict[str, Any], keep: list[str], variant: str, reconstruct: dict[str, Any],
                   kd_steps: int | None, max_tokens: int | None) -> dict[str, Any]:
    """The reference recipe cut after its pruned evaluation, plus the variant's stages and ``eval_recovered``."""
    out = {k: copy.deepcopy(v) for k, v in raw.items() if k not in ("stages", "output_dir")}
    out["stages"] = {k: copy.deepcopy(raw["stages"][k]) for k in keep}
    ev = eval_stage(raw, keep[-1], max_tokens)
    if variant == "dense":  # the dense model on the cut protocol: load, then evaluate
        out["stages"] = {"eval_dense_cut": ev}
        return out
    if variant == "pruned":
        if max_tokens is not None:
            out["stages"]["eval_pruned_cut"] = ev
        return out
    if variant in ("reconstruct", "reconstruct+kd"):
        out["stages"]["reconstruct"] = dict(reconstruct)
    if variant in ("kd", "kd-probe", "reconstruct+kd"):
        if kd_steps is None:
            raise BenchError(f"variant {variant}: no KD step count (pass --kd-steps or run the probe first)")
        kd = copy.deepcopy(KD)
        kd["loop"]["max_steps"] = kd_steps
        kd["optimizer"]["warmup_steps"] = min(KD["optimizer"]["warmup_steps"], max(kd_steps // 10, 0))
        out["stages"]["recover"] = kd
    if variant != "kd-probe":
        out["stages"]["eval_recovered"] = ev
    return out


def validate(recipe: dict[str, Any], path: Path) -> None:
    """The child's recipe through prunelab's own validation, before anything heavy runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    try:
        load_recipe(path)
    except RecipeError as exc:
        raise BenchError(f"{path}: {exc}") from None


def link_run(run: Path, folder: Path, keep: list[str]) -> None:
    """``folder`` = the reference run's kept stage folders hard-linked (never written: a stage writes a new folder) and
    its small files copied; a folder already there is left as it is (resume)."""
    if folder.exists():
        return
    folder.mkdir(parents=True)
    for entry in run.iterdir():
        stage = entry.name.split("-", 1)[-1] if entry.is_dir() and entry.name[:2].isdigit() else None
        if stage is not None and stage in ("load", *keep):
            shutil.copytree(entry, folder / entry.name, copy_function=os.link)
        elif entry.is_file() and entry.suffix in (".json", ".yaml", ".md", ".log"):
            shutil.copy2(entry, folder / entry.name)


def child(recipe: Path, output: Path, log: Path) -> float:
    """``pipeline/run.py RECIPE --resume`` in its own process (its threads as this process's); wall seconds."""
    cmd = [sys.executable, str(ROOT / "pipeline" / "run.py"), str(recipe), "--resume", "--no-progress",
           "--output-dir", str(output)]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; see {log}")
    return time.perf_counter() - t0


def run_variant(run: Path, raw: dict[str, Any], keep: list[str], work: Path, variant: str, recipe: dict[str, Any]
                ) -> dict[str, Any]:
    """Run (or restore) one variant; its metrics.json and how many of the reference's stages it restored."""
    name = raw["name"]
    base = work / variant.replace("+", "-")
    folder = base / name
    if variant != "dense":
        link_run(run, folder, keep)
    path = base / "recipe.yaml"
    validate(recipe, path)
    seconds = child(path, base, base / "child.log")
    text = (base / "child.log").read_text()
    if variant != "dense" and not any(f"-{keep[i]}: restored" in text for i in range(len(keep))):
        raise RuntimeError(f"{base / 'child.log'}: the reference stages were not restored (the recipe's hashes "
                           "differ from the run's); nothing upstream may be recomputed here")
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"metrics": metrics, "child_seconds": round(seconds, 1), "folder": str(folder)}


def stage_seconds(folder: Path, kinds: tuple[str, ...]) -> float:
    """Wall seconds of the run's stages of these kinds, from their ``done.json`` (the stage as the runner timed it)."""
    total = 0.0
    for done in folder.glob("[0-9][0-9]-*/done.json"):
        if done.parent.name.split("-", 1)[1] in kinds:
            total += float(json.loads(done.read_text()).get("seconds", 0.0))
    return round(total, 1)


def match_seconds(stage: Path, after: int, poll: float = 20.0) -> float:
    """The seconds of a reconstruct stage another process is running: its ``done.json`` once finished, else the mean
    of its first ``after`` blocks' seconds × the model's blocks (waits for them)."""
    if not stage.is_dir() or not stage.name.endswith("-reconstruct"):
        raise BenchError(f"--match-blocks {stage}: not a reconstruct stage folder (NN-reconstruct of a run)")
    while True:
        done = stage / "done.json"
        if done.is_file():
            return float(json.loads(done.read_text())["seconds"])
        records = sorted((stage / "blocks").glob("block-*.json")) if (stage / "blocks").is_dir() else []
        blocks = [json.loads(r.read_text()) for r in records]
        timed = [b["seconds"] for b in blocks if "seconds" in b and not b.get("resumed")]
        if len(timed) >= after:
            total = json.loads((stage.parent / "01-load" / "done.json").read_text()).get("outputs", {})
            n = int(total.get("layers_before") or 0) or None
            if n is None:
                raise BenchError(f"{stage.parent}/01-load/done.json: no block count to extrapolate from")
            return sum(timed) / len(timed) * n
        time.sleep(poll)


def ppl_row(evals: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """{set: {ppl, ratio, protocol}} against the dense numbers of the same sets."""
    return {k: {"ppl": round(v["ppl"], 3), "ratio": round(v["ppl"] / dense[k]["ppl"], 4), "tokens": v.get("tokens"),
                "protocol": v.get("protocol")} for k, v in evals.items() if k in dense}


def table(rows: list[dict[str, Any]], sets: list[str]) -> str:
    head = "| variant | " + " | ".join(f"{s} PPL (× dense)" for s in sets) + " | training tokens | seconds |"
    lines = [head, "|" + "---|" * (len(sets) + 3)]
    for r in rows:
        cells = [f"{r['ppl'][s]['ppl']:.2f} ({r['ppl'][s]['ratio']:.2f}×)" if s in r["ppl"] else "–" for s in sets]
        tokens = f"{r['tokens']:,}" if r.get("tokens") else "–"
        secs = f"{r['seconds']:,.0f}" if r.get("seconds") else "–"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {tokens} | {secs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from-run", type=Path, required=True, help="a finished width run's folder")
    p.add_argument("--work", type=Path, required=True, help="where each variant's run folder goes")
    p.add_argument("--variants", nargs="+", default=["pruned", "reconstruct", "kd"], choices=VARIANTS)
    p.add_argument("--reconstruct", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of BEST")
    p.add_argument("--kd", nargs="*", default=[], metavar="DOTTED.KEY=VALUE",
                   help="overrides of the KD stage, e.g. data.teacher_generate.num_samples=64")
    p.add_argument("--kd-steps", type=int, default=None, help="KD steps (default: the probe's equal wall-clock)")
    p.add_argument("--kd-seconds", type=float, default=None,
                   help="give KD this many seconds (default: the reconstruct variant's, or --match-blocks')")
    p.add_argument("--match-blocks", type=Path, default=None,
                   help="a reconstruct stage folder being written by another process (run the two variants side by "
                        "side, under the same load): KD gets its stage seconds, or its mean block seconds × blocks "
                        "once --match-after blocks are done")
    p.add_argument("--match-after", type=int, default=6, help="blocks to wait for with --match-blocks")
    p.add_argument("--max-tokens", type=int, default=None, help="cut every perplexity set to N tokens (a sweep)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "local-recovery",
                   help="folder for local_recovery.json / .md")
    args = p.parse_args(argv)

    run = args.from_run.resolve()
    raw, metrics, keep = reference(run)
    reconstruct = dict(BEST)
    for text in args.reconstruct:
        key, value = parse_override(text)
        reconstruct[key] = value
    for text in args.kd:
        key, value = parse_override(text)
        *path, last = key.split(".")
        node = KD
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    try:
        load_stages().get("reconstruct").config_cls(**reconstruct)
    except ValueError as exc:
        raise BenchError(f"--reconstruct: {exc}") from None
    if args.kd_steps is not None and args.kd_steps < 1:
        raise BenchError("--kd-steps: at least 1")
    work = args.work.resolve()
    results: dict[str, Any] = {}

    def go(variant: str, kd_steps: int | None = None) -> dict[str, Any]:
        recipe = variant_recipe(raw, keep, variant, reconstruct, kd_steps, args.max_tokens)
        print(f"[local_recovery] {variant}: running in {work / variant.replace('+', '-')}", flush=True)
        results[variant] = run_variant(run, raw, keep, work, variant, recipe)
        return results[variant]

    evals = metrics["eval"]
    # an evaluate stage files its numbers under the model's state (dense / pruned / recovered): a cut evaluation after
    # the run's own replaces them in the child's metrics.json
    dense_eval = evals["dense"] if args.max_tokens is None else go("dense")["metrics"]["eval"]["dense"]
    rows: list[dict[str, Any]] = []
    recon_seconds = args.kd_seconds
    probe_info: dict[str, Any] = {}
    for variant in args.variants:
        if variant == "pruned":
            got = evals["pruned"] if args.max_tokens is None else go("pruned")["metrics"]["eval"]["pruned"]
            rows.append({"variant": "pruned", "label": "pruned, optimal compensation only",
                         "ppl": ppl_row(got, dense_eval)})
            continue
        if variant == "reconstruct":
            m = go("reconstruct")["metrics"]
            info = m["recover"]["pruned"]
            recon_seconds = info["seconds"]
            rows.append({"variant": variant, "label": "+ block-local reconstruction (" + ", ".join(
                f"{k} {v}" for k, v in reconstruct.items() if k != "type") + ")",
                "ppl": ppl_row(m["eval"]["recovered"], dense_eval), "seconds": info["seconds"],
                "tokens": info["steps"] * info["tokens_per_step"], "calibration_tokens": info["calibration_tokens"],
                "relative_loss": [info["first_loss"], info["final_loss"]]})
            continue
        steps = args.kd_steps
        if steps is None:
            if recon_seconds is None and args.match_blocks is None:
                raise BenchError(f"variant {variant}: equal wall-clock needs the reconstruct variant first (list it "
                                 "before), --kd-seconds, --match-blocks or --kd-steps")
            if not probe_info:
                probe = go("kd-probe", PROBE_STEPS)["metrics"]["recover"]["pruned"]
                fixed = max(probe["seconds"] - PROBE_STEPS * probe["median_step_s"], 0.0)
                if recon_seconds is None:
                    recon_seconds = match_seconds(args.match_blocks, args.match_after)
                steps = max(1, round((recon_seconds - fixed) / probe["median_step_s"]))
                probe_info.update(median_step_s=probe["median_step_s"], fixed_s=round(fixed, 1), steps_chosen=steps,
                                  target_seconds=round(recon_seconds, 1))
                results["kd_probe"] = probe_info
            steps = probe_info["steps_chosen"]
        if variant == "reconstruct+kd":
            steps = max(1, steps // 4)
        done = go(variant, steps)
        m = done["metrics"]
        info = m["recover"]["pruned"]
        seconds = stage_seconds(Path(done["folder"]), ("reconstruct", "recover"))
        rows.append({"variant": variant, "label": ("+ reconstruction, then " if variant != "kd" else "+ ")
                     + f"global LoRA KD, {steps} steps", "ppl": ppl_row(m["eval"]["recovered"], dense_eval),
                     "seconds": seconds, "kd_seconds": info["seconds"], "tokens": steps * info["tokens_per_step"],
                     "median_step_s": info.get("median_step_s")})
    sets = list(dense_eval)
    text = table(rows, sets)
    print(text)
    protocol = {s: dense_eval[s].get("protocol") for s in sets}
    out = {"from_run": str(run), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                      f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
           "protocol": protocol, "dense": {s: round(dense_eval[s]["ppl"], 3) for s in sets},
           "reconstruct_settings": reconstruct, "kd_settings": KD, "rows": rows,
           "kd_probe": results.get("kd_probe"),
           "children": {k: {"seconds": v["child_seconds"], "folder": v["folder"]} for k, v in results.items()
                        if isinstance(v, dict) and "child_seconds" in v}}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "local_recovery.json").write_text(json.dumps(out, indent=2) + "\n")
        md = [f"# Block-local reconstruction vs global KD ({out['date']})", "",
              f"From `{run}`; `python -m prunelab.benchmarks.local_recovery` ({' '.join(sys.argv[1:])}).", "",
              "Protocol: " + "; ".join(f"{s}: {t}" for s, t in protocol.items()), "",
              f"Dense: " + ", ".join(f"{s} {v}" for s, v in out["dense"].items()) + f". Machine: {out['machine']} "
              "(shared: seconds are under the load of the time).", "", text, ""]
        (args.out / "local_recovery.md").write_text("\n".join(md))
    return out


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"local_recovery: {exc}", file=sys.stderr)
        sys.exit(2)
