"""Calibration table: each method's recipe re-run with every calibration source, each evaluated on every domain.

``python pipeline/bench_calibration.py recipes/bench/smollm2-calibration.yaml [--out DIR] [--rows bi,ppl--mix]
[--previous OLD.json] [--finished-only]``

The spec names base recipes (methods), calibration sources (by label) and the evaluation every row gets
(it replaces the recipes' own evaluate stages; their recover and export stages are dropped: pruning only). Each (method, source)
pair runs as a normal recipe through the CLI in its own process — same code path as a user run, and it
resumes: rows whose ``metrics.json`` exists are read back, not re-run. The dense model is evaluated once
with the same evaluation. Prints a markdown table (perplexity and ratio to dense per domain) and writes
``<spec name>.json`` beside the runs (``--finished-only`` tabulates the rows already run).

A row costs 10–35 minutes on two CPU cores, so the table grows over several sessions: ``--rows`` runs only the
named methods (``bi``) or rows (``bi--mix``), the others are only read back if finished; ``--previous`` takes rows
of an earlier run's JSON when their folder is absent from ``--out`` and their definition — the method's entry, the
calibration source behind the label and the evaluation — is unchanged (marked ``"from"`` in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from prunelab.rundir import atomic_write_json


def _recipe(base: dict[str, Any], name: str, source: dict[str, Any] | None, evaluation: dict[str, Any]) -> dict[str, Any]:
    """``base`` with its calibration source swapped, its evaluate/export stages replaced by one evaluation and its
    recover stage dropped: the table compares what calibration does to the *pruning* (recovery has its own bench,
    ``bench_recovery``, where every row trains the same steps)."""
    r = copy.deepcopy(base)
    r["name"] = name
    stages: dict[str, Any] = {}
    for key, cfg in r["stages"].items():
        if cfg["type"] in ("evaluate", "export", "recover"):
            continue
        if cfg["type"] == "calibrate" and source is not None:
            cfg = {**cfg, "source": source}
        stages[key] = cfg
    stages["eval"] = {"type": "evaluate", **evaluation}
    r["stages"] = stages
    return r


def _base(entry: str | dict[str, Any]) -> dict[str, Any]:
    """A method: a recipe path, or ``{recipe: path, prune: {...}}`` whose keys replace the prune stage's."""
    if isinstance(entry, str):
        entry = {"recipe": entry}
    base = yaml.safe_load(Path(entry["recipe"]).read_text())
    for cfg in base["stages"].values():
        if cfg["type"] == "prune" and "prune" in entry:
            for key, value in entry["prune"].items():
                if value is None:
                    cfg.pop(key, None)
                else:
                    cfg[key] = value
    return base


def _dense(base: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    return {"name": "dense", "seed": base.get("seed", 0), "model": base["model"],
            "stages": {"eval": {"type": "evaluate", "label": "dense", **evaluation}}}


def previous_rows(spec: dict[str, Any], old: dict[str, Any], source: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows of an earlier JSON whose definition equals this spec's, keyed by (method, calibration label).

    Any difference — another base recipe or prune override, another source behind the label, another
    evaluation — drops the old row, so it is run again; the dense row depends on the evaluation only."""
    if spec.get("evaluation") != old["spec"].get("evaluation"):
        return {}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for row in old["rows"]:
        method, label = row["method"], row["calibration"]
        same = method == "dense" or (
            spec["methods"].get(method) is not None and spec["methods"].get(method) == old["spec"]["methods"].get(method)
            and spec["calibrations"].get(label) is not None
            and spec["calibrations"].get(label) == old["spec"]["calibrations"].get(label))
        if same:
            out[(method, label)] = {**row, "from": source}
    return out


def selected(method: str, label: str, wanted: list[str]) -> bool:
    """Whether ``--rows`` asks for this row: by method name or by ``method--label``; nothing named = all."""
    return not wanted or method in wanted or f"{method}--{label}" in wanted


def _run(recipe: dict[str, Any], out: Path, finished_only: bool = False) -> dict[str, Any] | None:
    metrics = out / recipe["name"] / "metrics.json"
    if metrics.is_file() and (out / recipe["name"] / "report.md").is_file():
        return json.loads(metrics.read_text())
    if finished_only:
        return None
    path = out / "recipes" / f"{recipe['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "pipeline" / "run.py"), str(path), "--output-dir", str(out), "--no-progress"]
    if (out / recipe["name"]).exists():
        cmd.append("--resume")
    t0 = time.perf_counter()
    log = out / f"{recipe['name']}.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"{recipe['name']} failed (exit {rc}); see {log}")
    print(f"  {recipe['name']}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(metrics.read_text())


def table(rows: list[dict[str, Any]], domains: list[str]) -> str:
    head = "| method | calibration | params | " + " | ".join(f"{d} PPL (× dense)" for d in domains) + " |"
    lines = [head, "|" + "---|" * (3 + len(domains))]
    for r in rows:
        cells = [f"{r['ppl'][d]:.2f} ({r['ratio'][d]:.2f}×)" for d in domains]
        lines.append(f"| {r['method']} | {r['calibration']} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--out", default="bench-out/calibration")
    p.add_argument("--finished-only", action="store_true", help="tabulate the rows already run; run nothing")
    p.add_argument("--rows", default="", help="comma-separated methods or method--label rows to run (default: all)")
    p.add_argument("--previous", default=None,
                   help="JSON of an earlier run: its unchanged rows count as finished when absent from --out")
    args = p.parse_args(argv)
    spec = yaml.safe_load(Path(args.spec).read_text())
    out = Path(args.out)
    evaluation = spec["evaluation"]
    domains = list(evaluation["perplexity"])
    wanted = [r for r in args.rows.split(",") if r]
    names = set(spec["methods"]) | {f"{m}--{lb}" for m in spec["methods"] for lb in spec["calibrations"]}
    if unknown := [r for r in wanted if r not in names]:
        raise SystemExit(f"--rows: {unknown} not in {args.spec} (methods: {', '.join(spec['methods'])}; "
                         f"labels: {', '.join(spec['calibrations'])}; a row is method--label)")
    prev = json.loads(Path(args.previous).read_text()) if args.previous else {}
    old = previous_rows(spec, prev, args.previous) if args.previous else {}
    bases = {m: _base(entry) for m, entry in spec["methods"].items()}
    dense_recipe = _dense(next(iter(bases.values())), evaluation)
    here = (out / "dense" / "metrics.json").is_file()
    dense_metrics = _run(dense_recipe, out, args.finished_only or (("dense", "-") in old and not here))
    if dense_metrics is not None:
        dense = {d: dense_metrics["eval"]["dense"][d]["ppl"] for d in domains}
        protocol = {d: dense_metrics["eval"]["dense"][d]["protocol"] for d in domains}
        rows = [{"method": "dense", "calibration": "-", "params": dense_metrics["model"]["params_before"],
                 "ppl": dense, "ratio": dict.fromkeys(domains, 1.0)}]
    elif ("dense", "-") in old:
        rows, dense, protocol = [old[("dense", "-")]], old[("dense", "-")]["ppl"], prev["protocol"]
    else:
        raise SystemExit(f"no finished dense row in {out}; run without --finished-only first")
    for method, base in bases.items():
        for label, source in spec["calibrations"].items():
            name = f"{method}--{label}"
            here = (out / name / "metrics.json").is_file()
            skip = args.finished_only or not selected(method, label, wanted) or ((method, label) in old and not here)
            m = _run(_recipe(base, name, source, evaluation), out, skip)
            if m is None:
                if (method, label) in old:
                    rows.append(old[(method, label)])
                continue
            ev = m["eval"]["pruned"]
            rows.append({"method": method, "calibration": label, "params": m["model"]["params_after"],
                         "ppl": {d: ev[d]["ppl"] for d in domains},
                         "ratio": {d: ev[d]["ppl"] / dense[d] for d in domains}})
    atomic_write_json(out / f"{Path(args.spec).stem}.json", {"spec": spec, "protocol": protocol, "rows": rows})
    print(table(rows, domains))
    for d, text in protocol.items():
        print(f"- {d}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
