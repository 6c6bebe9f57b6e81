"""Calibration table: each method's recipe re-run with every calibration source, each evaluated on every domain.

``python pipeline/bench_calibration.py recipes/bench/smollm2-calibration.yaml [--out DIR]``

The spec names base recipes (methods), calibration sources (by label) and the evaluation every row gets
(it replaces the recipes' own evaluate stages; their export stages are dropped). Each (method, source)
pair runs as a normal recipe through the CLI in its own process — same code path as a user run, and it
resumes: rows whose ``metrics.json`` exists are read back, not re-run. The dense model is evaluated once
with the same evaluation. Prints a markdown table (perplexity and ratio to dense per domain) and writes
``<spec name>.json`` beside the runs (``--finished-only`` tabulates the rows already run).
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


def _recipe(base: dict[str, Any], name: str, source: dict[str, Any] | None, evaluation: dict[str, Any]) -> dict[str, Any]:
    """``base`` with its calibration source swapped, its evaluate/export stages replaced by one evaluation."""
    r = copy.deepcopy(base)
    r["name"] = name
    stages: dict[str, Any] = {}
    for key, cfg in r["stages"].items():
        if cfg["type"] in ("evaluate", "export"):
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
    args = p.parse_args(argv)
    spec = yaml.safe_load(Path(args.spec).read_text())
    out = Path(args.out)
    evaluation = spec["evaluation"]
    domains = list(evaluation["perplexity"])
    bases = {m: _base(entry) for m, entry in spec["methods"].items()}
    dense_metrics = _run(_dense(next(iter(bases.values())), evaluation), out, args.finished_only)
    if dense_metrics is None:
        raise SystemExit(f"no finished dense row in {out}; run without --finished-only first")
    dense = dense_metrics["eval"]["dense"]
    rows = [{"method": "dense", "calibration": "-", "params": None, "ppl": {d: dense[d]["ppl"] for d in domains},
             "ratio": dict.fromkeys(domains, 1.0)}]
    for method, base in bases.items():
        for label, source in spec["calibrations"].items():
            m = _run(_recipe(base, f"{method}--{label}", source, evaluation), out, args.finished_only)
            if m is None:
                continue
            ev = m["eval"]["pruned"]
            rows.append({"method": method, "calibration": label, "params": m["model"]["params_after"],
                         "ppl": {d: ev[d]["ppl"] for d in domains},
                         "ratio": {d: ev[d]["ppl"] / dense[d]["ppl"] for d in domains}})
    rows[0]["params"] = dense_metrics["model"]["params_before"]
    protocol = {d: dense[d]["protocol"] for d in domains}
    (out / f"{Path(args.spec).stem}.json").write_text(json.dumps({"spec": spec, "protocol": protocol, "rows": rows}, indent=2))
    print(table(rows, domains))
    for d, text in protocol.items():
        print(f"- {d}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
