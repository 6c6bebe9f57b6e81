"""Choose a recipe's calibration draw on held-out text: the same recipe run with K seeds, each pruned model
scored on held-out *validation* text, the best one named — and every draw's test number printed beside it.

``python pipeline/select_draw.py RECIPE --seeds 0-7 [--holdout PATH] [--holdout-tokens N] [--out DIR]``

Why: a one-shot criterion fed a few hundred calibration tokens (LLM-Pruner's 10 × 64) gives a plan that
depends on which windows were drawn — on SmolLM2 the official LLM-Pruner configuration spans 93.8–104.1
WikiText-2 test perplexity over three draws (docs/llm-pruner-parity.md). Picking the draw is model
selection, so it is done on validation text, never on the test text the table reports; every draw's
test perplexity is printed too, so a reader sees where the chosen one sits in the spread.

Each seed runs the recipe through the CLI in its own process (same code path as a user run; finished
seeds are read back, a killed one resumes) with the recipe's evaluate / export stages replaced by two
evaluations after pruning: ``holdout`` (the selection text, by default the first ``--holdout-tokens`` of
WikiText-2 valid at 512-token windows) and the recipe's own last evaluation (the reported one). The
held-out text may share a few lines with the calibration windows (both come from valid; with LLM-Pruner's
10 × 64 that is at most 640 of the 30,720 scored tokens, 2%), which a table quoting it should say.
Prints a markdown table and writes ``select-draw.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.bench_calibration import _run

HOLDOUT = "../shared/data/wikitext2/valid.txt"


def parse_seeds(text: str) -> list[int]:
    """``"0-7"`` → 0…7; ``"1,5,42"`` → those; a mix of both is allowed."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi < lo:
                raise SystemExit(f"--seeds: range {part!r} runs backwards")
            seeds += range(lo, hi + 1)
        elif part:
            seeds.append(int(part))
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: give at least two distinct seeds (got {text!r})")
    return seeds


def draw_recipe(base: dict[str, Any], seed: int, holdout: dict[str, Any]) -> dict[str, Any]:
    """The recipe for one seed: up to pruning as written, then the held-out and the reported evaluations."""
    stages = base["stages"]
    if not any(c["type"] == "calibrate" for c in stages.values()):
        raise SystemExit("the recipe has no calibrate stage: there is no calibration draw to choose")
    if any(c["type"] in ("recover", "iterate") for c in stages.values()):
        raise SystemExit("select_draw chooses a one-shot plan: drop the recover / iterate stages from the recipe")
    evals = [c for c in stages.values() if c["type"] == "evaluate"]
    reported = copy.deepcopy(evals[-1]) if evals else {"type": "evaluate"}
    reported.pop("label", None)  # both evaluations land under the pruned model's label, side by side
    if "holdout" in (reported.get("perplexity") or {}):
        raise SystemExit("the recipe's evaluation already has a dataset named 'holdout': rename it")
    kept = {k: copy.deepcopy(c) for k, c in stages.items() if c["type"] not in ("evaluate", "export")}
    name = f"{base['name']}--seed{seed}"
    return {**copy.deepcopy(base), "name": name, "seed": seed,
            "stages": {**kept, "holdout": {"type": "evaluate", "perplexity": {"holdout": holdout}}, "eval": reported}}


def summarize(seed: int, m: dict[str, Any]) -> dict[str, Any]:
    """One seed's line: the held-out perplexity (selection) and the reported evaluation's perplexities."""
    ev = m["eval"]["pruned"]
    return {"seed": seed, "params": m["model"]["params_after"], "holdout": ev["holdout"]["ppl"],
            "reported": {d: v["ppl"] for d, v in ev.items() if "ppl" in v and d != "holdout"}}


def table(lines: list[dict[str, Any]], best: int) -> str:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--seeds", default="0-7", help="seeds to draw with: a range 0-7 and/or a list 1,5,42")
    p.add_argument("--holdout", default=HOLDOUT, help="selection text (a validation split; never the test text)")
    p.add_argument("--holdout-tokens", type=int, default=30720, help="score the first N tokens of it")
    p.add_argument("--seq-len", type=int, default=512, help="held-out window length")
    p.add_argument("--out", default="bench-out/select-draw")
    p.add_argument("--finished-only", action="store_true", help="tabulate the seeds already run; run nothing")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    if "test" in Path(args.holdout).name:
        raise SystemExit(f"--holdout {args.holdout!r} looks like a test split: select on validation text")
    if not Path(args.holdout).is_file():
        raise SystemExit(f"--holdout: file {args.holdout!r} not found")
    base = yaml.safe_load(Path(args.recipe).read_text())
    holdout = {"source": {"path": args.holdout}, "seq_len": args.seq_len, "max_tokens": args.holdout_tokens}
    out = Path(args.out)
    lines = []
    for seed in seeds:
        m = _run(draw_recipe(base, seed, holdout), out, args.finished_only)
        if m is not None:
            lines.append(summarize(seed, m))
    if not lines:
        raise SystemExit(f"no finished seeds in {out}")
    best = min(lines, key=lambda r: r["holdout"])["seed"]
    (out / "select-draw.json").write_text(json.dumps(
        {"recipe": args.recipe, "holdout": holdout, "chosen_seed": best, "draws": lines}, indent=2))
    print(table(lines, best))
    print(f"\nchosen: seed {best} (lowest held-out perplexity); set `seed: {best}` in {args.recipe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
