"""``prunelab bench SPEC`` (also ``python -m prunelab bench SPEC``): run a benchmark spec's rows, write its table.

    prunelab bench bench/smollm2-20 [--resume | --force] [--shard I/N] [--rows a,b] [--update-readme FILE]
    prunelab bench RECIPE --seeds 0-7 [--holdout valid.txt]     choose a recipe's calibration draw on held-out text

Writes ``bench.json`` and ``bench.md`` under ``<output_dir>/<name>/``, every row's run directory under
``rows/``; ``--resume`` continues a killed bench (finished rows are read back, the runner resumes the others).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from prunelab.benchmarks import tables
from prunelab.benchmarks.execute import Outcome, parse_shard, rows_of, run_rows, write_json
from prunelab.benchmarks.grid import assemble, to_markdown
from prunelab.benchmarks.spec import Bench, BenchError, build, load_bench
from prunelab.benchmarks.tables import HOLDOUT, compile_select_draw, parse_seeds
from prunelab.rundir import atomic_write_text

__all__ = ["main", "report", "update_readme"]


def update_readme(readme: Path, name: str, table: str) -> None:
    """Replace the table between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {start} … {end} markers to replace")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{table}{end}", text))


def _checksums(bench: Bench) -> list[str]:
    """Checksums of the shared data the rows read, verified before anything runs (a changed file is refused)."""
    from prunelab.stages.io.text import verify_checksum  # lazy: torch-free

    return [verify_checksum(p) for p in bench.info.get("checksums", [])]


def report(bench: Bench, outcome: Outcome, command: str, checked: list[str], t_start: float) -> tuple[dict[str, Any], str]:
    """The bench's JSON and Markdown table, by the table its spec was written for."""
    if bench.kind == "grid":
        data = assemble(bench, outcome.metrics, outcome.reused, checked, t_start)
        return data, to_markdown(data, command)
    return tables.assemble(bench, outcome.metrics, command)


def _load(args: argparse.Namespace) -> Bench:
    if args.seeds is None:
        return load_bench(args.spec, args.output_dir)
    data = compile_select_draw(args.spec, parse_seeds(args.seeds), args.holdout or HOLDOUT, args.holdout_tokens,
                               args.seq_len, args.output_dir or "bench-out")
    return build(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prunelab bench", description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--update-readme", metavar="FILE", help="replace the table between this benchmark's markers")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="read finished rows back and let the runner continue the others")
    again.add_argument("--force", action="store_true", help="delete an earlier run's rows and start over")
    p.add_argument("--shard", metavar="I/N", default=None,
                   help="run only every N-th row from the I-th (0-based); a later --resume run without --shard "
                        "reads them back and writes the table")
    p.add_argument("--rows", default="", help="comma-separated rows (or methods: a row name's part before '--') to run; "
                   "the others are only read back if finished")
    p.add_argument("--finished-only", action="store_true", help="tabulate the rows already finished; run nothing")
    p.add_argument("--output-dir", default=None, help="write under this folder instead of the spec's output_dir")
    p.add_argument("--progress", action="store_true", help="progress bars")
    draw = p.add_argument_group("choosing a calibration draw (SPEC is then a recipe)")
    draw.add_argument("--seeds", default=None, help="run the recipe with each seed (0-7 and/or 1,5,42) and name the draw "
                      "with the lowest held-out perplexity")
    draw.add_argument("--holdout", default=None, help="selection text (a validation split; never the test text)")
    draw.add_argument("--holdout-tokens", type=int, default=30720, help="score the first N tokens of it")
    draw.add_argument("--seq-len", type=int, default=512, help="held-out window length")
    args = p.parse_args(argv)
    try:
        shard = parse_shard(args.shard, args.resume or args.finished_only)
    except ValueError as exc:
        p.error(str(exc))
    t_start = time.perf_counter()
    try:
        bench = _load(args)
        checked = _checksums(bench)
        only = [] if args.finished_only else rows_of(bench, args.rows)
        outcome = run_rows(bench, args.resume or args.finished_only, args.force, shard or (0, 1), only, args.progress)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(bench.output_dir) / bench.name
    if shard:
        done = sum(m is not None for m in outcome.metrics.values())
        print(f"shard {shard[0]}/{shard[1]}: {done} of {len(bench.rows)} rows finished under {bench.rows_dir}; run "
              f"without --shard, with --resume, to write the table")
        return 0
    if not any(m is not None for m in outcome.metrics.values()):
        print(f"error: no finished rows under {bench.rows_dir}", file=sys.stderr)
        return 2
    try:
        data, table = report(bench, outcome, f"prunelab bench {args.spec}", checked, t_start)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json(out / "bench.json", data)
    atomic_write_text(out / "bench.md", table)
    print(table)
    if args.update_readme:
        update_readme(Path(args.update_readme), bench.name, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
