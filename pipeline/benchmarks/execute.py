"""The one executor: every row of a :class:`~prunelab.benchmarks.spec.Bench` through ``prunelab.runner``.

Each row is the user's own path — preflight, then ``runner.execute`` into ``<output_dir>/<bench>/rows/<row>`` — in
this process, one row after another. What survives a killed bench is the runner's: a finished row (its
``metrics.json`` and ``report.md`` written for this very recipe) is read back; an unfinished or changed one is
resumed by the runner, which restores every stage whose chained settings and input hashes match and runs the rest.
``--shard I/N`` runs every N-th row from the I-th; the shards share the rows folder, and a run without a shard
then reads every finished row back and writes the table.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunelab.benchmarks.spec import Bench, BenchError
from prunelab.preflight import preflight
from prunelab.recipe import RecipeBase, RecipeError
from prunelab.rundir import RunDirError, atomic_write_json, prepare_run_dir
from prunelab.runlog import RunLog
from prunelab import runner
from prunelab.runner import RunError

__all__ = ["Outcome", "finished_metrics", "parse_shard", "run_rows"]


@dataclass
class Outcome:
    """Each row's ``metrics.json`` (None: not finished — another shard's, or not asked for) and which rows were
    read back from an earlier run rather than run here."""

    metrics: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)


def parse_shard(text: str | None, resume: bool) -> tuple[int, int] | None:
    """``"I/N"`` → (I, N); shards must resume (each reads what the others finished)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not int(m[1]) < int(m[2]):
        raise ValueError(f"--shard {text}: write I/N with 0 <= I < N, e.g. --shard 0/2")
    if not resume:
        raise ValueError("--shard needs --resume: the shards share the rows folder, each reuses what the others finished")
    return int(m[1]), int(m[2])


def finished_metrics(recipe: RecipeBase) -> dict[str, Any] | None:
    """The row's ``metrics.json`` when its run finished (``report.md`` is written last) for exactly this recipe."""
    run_dir = recipe.run_dir
    try:
        if not (run_dir / "report.md").is_file():
            return None
        ran = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
        if ran != json.loads(json.dumps(recipe.resolved())):
            return None
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def run_rows(bench: Bench, resume: bool = False, force: bool = False, shard: tuple[int, int] = (0, 1),
             only: list[str] | None = None, progress: bool = False) -> Outcome:
    """Run (or read back) every row that is this shard's and in ``only`` (None: all); the others are read back if
    finished. Every row to run is preflighted before the first one starts."""
    root = bench.rows_dir
    try:
        prepare_run_dir(root, resume, force)
    except RunDirError as exc:
        if force:
            raise BenchError(str(exc)) from None
        raise BenchError(f"{root} holds rows of an earlier run of this bench; pass --resume to reuse the finished "
                         f"ones (the runner continues the others), or --force to start over") from None
    index, count = shard
    out = Outcome()
    todo: list[RecipeBase] = []
    for i, (row, recipe) in enumerate(zip(bench.rows, bench.recipes())):
        done = finished_metrics(recipe)
        out.metrics[row.name] = done
        if done is not None:
            out.reused.append(row.name)
        elif i % count == index and (only is None or row.name in only):
            todo.append(recipe)
    problems: list[str] = []
    for recipe in todo:
        try:
            preflight(recipe)
        except RecipeError as exc:
            problems += [f"row {recipe.name!r}: {p}" for p in exc.problems]
    if problems:
        raise BenchError("rows refused before anything ran:\n  - " + "\n  - ".join(problems))
    for recipe in todo:
        again = recipe.run_dir.is_dir() and any(recipe.run_dir.iterdir())
        with RunLog(recipe.run_dir, resume=again) as log:  # the row's run.log, as a user run's
            try:
                out.metrics[recipe.name] = runner.execute(recipe, recipe.run_dir, resume=again, progress=progress)
            except RunError as exc:
                raise BenchError(f"row {recipe.name!r}: {exc}") from None
            except (Exception, KeyboardInterrupt) as exc:
                log.write_traceback(exc)
                raise
    return out


def rows_of(bench: Bench, names: str) -> list[str] | None:
    """``--rows a,b``: row names, or a prefix before ``--`` (a method of a methods × sources grid), and the dense
    row every ratio needs; None: all."""
    wanted = [n for n in names.split(",") if n]
    if not wanted:
        return None
    all_names = [r.name for r in bench.rows]
    picked = [r.name for r in bench.rows if r.name in wanted or r.name.split("--")[0] in wanted or r.meta.get("dense")]
    unknown = [w for w in wanted if w not in all_names and not any(n.split("--")[0] == w for n in all_names)]
    if unknown:
        raise BenchError(f"--rows: {unknown} are not rows of {bench.name} (rows: {', '.join(all_names)})")
    return picked


def write_json(path: Path, value: Any) -> None:
    atomic_write_json(path, value)
