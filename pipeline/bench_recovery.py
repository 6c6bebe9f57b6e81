"""Recovery table: one pruned model per base recipe, healed by each listed recovery, each on every domain.

``python pipeline/bench_recovery.py recipes/bench/smollm2-recovery.yaml [--out DIR] [--rows a,b] [--finished-only]
[--previous OLD.json]``

The spec names base recipes (a method: its calibrate / score / prune stages), one shared ``recover`` block
(every recovered row merges its own ``recover`` keys over it, so all rows train the same optimizer steps ×
tokens unless a row says otherwise), and the rows:

- ``{dense: true}``: the dense model, evaluated only;
- ``{base: b}``: the pruned model, no recovery;
- ``{base: b, recover: {...}}``: pruned, then the recover stage (``control: true`` there also heals the DENSE
  model the same way and evaluates it as ``control``);
- ``{base: b, iterate: {cycles: n}, recover: {...}}``: the base's prune settings reached in ``n`` prune → recover
  cycles (the ``iterate`` stage); ``loop.max_steps`` is split evenly over the cycles so the row trains the same
  total steps as a one-shot row.

Every row gets the same evaluation (the spec's ``evaluation``, else the evaluate stage's default suite: two
text domains and ARC-Easy in full). Rows run as normal recipes through the CLI, each in its own process (as
``bench_calibration``: same code path as a user run; finished rows are read back, a killed row resumes).
``--previous`` reads rows of an earlier run of the SAME spec from its JSON (a table grown over several sessions:
each row costs up to an hour on two CPU cores): a row is taken from there only when its folder is absent from
``--out`` and its definition — the row, its base, the shared ``recover`` block, the evaluation — is unchanged;
such rows are marked ``"from"`` in the JSON. Prints a markdown table (perplexity and its ratio to dense per domain, ARC-Easy acc / acc_norm, training
tokens/s with and without the teacher's forward) and writes ``<spec name>.json`` beside the runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from prunelab.rundir import atomic_write_json

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunelab.bench_calibration import _base, _run


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``, nested dicts key by key (a scalar or list replaces)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def row_recipe(name: str, row: dict[str, Any], bases: dict[str, dict[str, Any]], recover: dict[str, Any],
               evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """The recipe one row runs: the base's pruning stages, then its recovery (or cycles), then the evaluation."""
    unknown = set(row) - {"dense", "base", "recover", "iterate"}
    if unknown:
        raise SystemExit(f"row {name!r}: unknown keys {sorted(unknown)} (allowed: dense, base, recover, iterate)")
    ev = {"type": "evaluate", **(evaluation or {})}
    if row.get("dense"):
        first = next(iter(bases.values()))
        return {"name": name, "seed": first.get("seed", 0), "model": first["model"],
                "stages": {"eval": {**ev, "label": "dense"}}}
    if row.get("base") not in bases:
        raise SystemExit(f"row {name!r}: base must be one of {sorted(bases)} (got {row.get('base')!r})")
    base = copy.deepcopy(bases[row["base"]])
    rec = _merge(recover, row["recover"]) if "recover" in row else None
    stages: dict[str, Any] = {}
    for key, cfg in base["stages"].items():
        if cfg["type"] in ("evaluate", "export", "recover"):
            continue
        if cfg["type"] == "prune" and "iterate" in row:
            stages["iterate"] = _iterate(name, cfg, base["stages"], row["iterate"], rec)
            continue
        if cfg["type"] == "score" and "iterate" in row:
            continue
        stages[key] = cfg
    if rec is not None and "iterate" not in row:
        stages["recover"] = {"type": "recover", **rec}
    stages["eval"] = ev
    return {**base, "name": name, "stages": stages}


def _iterate(name: str, prune: dict[str, Any], all_stages: dict[str, Any], it: dict[str, Any],
             rec: dict[str, Any] | None) -> dict[str, Any]:
    if rec is None:
        raise SystemExit(f"row {name!r}: iterate needs a recover block (every cycle heals)")
    cycles = int(it["cycles"])
    rec = _merge(rec, {"loop": {"max_steps": rec.get("loop", {}).get("max_steps", 0) // cycles}})
    rec.pop("control", None)
    settings = {k: v for k, v in prune.items() if k != "type"}
    score = next((c for c in all_stages.values() if c["type"] == "score"), {})
    return {"type": "iterate", "cycles": cycles, "prune": settings, "recover": rec,
            **({"settings": score["settings"]} if score.get("settings") else {}),
            **({"batch_size": score["batch_size"]} if score.get("batch_size") else {})}


def previous_rows(spec: dict[str, Any], old: dict[str, Any], source: str) -> dict[str, list[dict[str, Any]]]:
    """The rows of an earlier bench JSON whose definition equals this spec's, keyed by spec row name.

    A row's definition is its entry, its base's entry, the shared ``recover`` block and the evaluation; any
    difference (another step count, another base recipe) drops the old row, so it is run again."""
    same_shared = all(spec.get(k) == old["spec"].get(k) for k in ("recover", "evaluation"))
    out: dict[str, list[dict[str, Any]]] = {}
    for line in old["rows"]:
        name = line["row"].split(" → ")[0]
        row = spec["rows"].get(name)
        if row is None or row != old["spec"]["rows"].get(name):
            continue
        base = row.get("base")
        if base is not None and spec["bases"].get(base) != old["spec"]["bases"].get(base):
            continue
        if not same_shared and not row.get("dense"):
            continue
        if row.get("dense") and spec.get("evaluation") != old["spec"].get("evaluation"):
            continue
        out.setdefault(name, []).append({**line, "from": source})
    return out


def summarize(name: str, m: dict[str, Any], dense: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished row's table lines: the row's last label (dense / pruned / recovered) and, if any, its control."""
    evals = m["eval"]
    label = next(lb for lb in ("recovered", "pruned", "dense") if lb in evals)
    labels = [(name, label)] + ([(f"{name} → dense control", "control")] if "control" in evals else [])
    out = []
    for row_name, lb in labels:
        ev = evals[lb]
        rec = m.get("recover", {}).get("pruned" if lb == "recovered" else lb, {})
        out.append({"row": row_name, "label": lb,
                    "params": m["model"]["params_after"] if lb in ("pruned", "recovered") else m["model"]["params_before"],
                    "ppl": {d: v["ppl"] for d, v in ev.items() if "ppl" in v},
                    "ratio": {d: v["ppl"] / dense[d]["ppl"] for d, v in ev.items() if "ppl" in v and d in dense},
                    "tasks": {d: {k: v.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
                              for d, v in ev.items() if "acc" in v},
                    "steps": rec.get("steps"), "tokens_per_step": rec.get("tokens_per_step"),
                    "tokens_per_s": rec.get("tokens_per_s"),
                    "tokens_per_s_without_teacher": (rec.get("teacher") or {}).get("tokens_per_s_without_teacher"),
                    "recover_s": rec.get("seconds"), "final_loss": rec.get("final_loss")})
    return out


def table(rows: list[dict[str, Any]]) -> str:
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
        speed = r["tokens_per_s"]
        nt = r["tokens_per_s_without_teacher"]
        cells.append(f"{speed}" + (f" ({nt})" if nt else "") if speed else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--out", default="bench-out/recovery")
    p.add_argument("--rows", default="", help="comma-separated row names to run (default: all, in spec order)")
    p.add_argument("--finished-only", action="store_true", help="tabulate the rows already run; run nothing")
    p.add_argument("--previous", default=None,
                   help="JSON of an earlier run of this spec: its unchanged rows count as finished when absent from --out")
    args = p.parse_args(argv)
    spec = yaml.safe_load(Path(args.spec).read_text())
    out = Path(args.out)
    prev = json.loads(Path(args.previous).read_text()) if args.previous else {}
    old = previous_rows(spec, prev, args.previous) if args.previous else {}
    bases = {b: _base(entry) for b, entry in spec["bases"].items()}
    wanted = [r for r in args.rows.split(",") if r]
    missing = [r for r in wanted if r not in spec["rows"]]
    if missing:
        raise SystemExit(f"--rows: no rows {missing} in {args.spec} (rows: {', '.join(spec['rows'])})")
    recipes = {n: row_recipe(n, row, bases, spec.get("recover", {}), spec.get("evaluation")) for n, row in spec["rows"].items()}
    dense_name = next((n for n, row in spec["rows"].items() if row.get("dense")), None)
    if dense_name is None:
        raise SystemExit("the spec needs a row {dense: true}: every ratio is to the dense model")
    finished: dict[str, dict[str, Any]] = {}
    for n, recipe in recipes.items():
        here = (out / n / "metrics.json").is_file()
        only = args.finished_only or (wanted and n not in wanted and n != dense_name) or (n in old and not here)
        m = _run(recipe, out, bool(only))
        if m is not None:
            finished[n] = m
    if dense_name in finished:
        dense = finished[dense_name]["eval"]["dense"]
        protocol = {d: v["protocol"] for d, v in dense.items() if "protocol" in v}
    elif dense_name in old:
        dense = {d: {"ppl": v} for d, v in old[dense_name][0]["ppl"].items()}
        protocol = prev.get("protocol", {})
    else:
        raise SystemExit(f"no finished dense row in {out}; run it first")
    rows = []
    for n in recipes:  # spec order; a row run here wins over the same row in --previous
        rows += summarize(n, finished[n], dense) if n in finished else old.get(n, [])
    payload = {"spec": spec, "protocol": protocol, "rows": rows}
    atomic_write_json(out / f"{Path(args.spec).stem}.json", payload)
    print(table(rows))
    for d, text in protocol.items():
        print(f"- {d}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
