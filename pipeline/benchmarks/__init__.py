"""Benchmarks: validated specs of recipes, each row run through :mod:`prunelab.runner` — outside the frame.

The frame (``prunelab.run``, ``recipe``, ``runner``, ``registry``, ``context``, ``report``, ``preflight``) runs ONE
recipe. A benchmark is many recipes and a table, so it lives here, on top of the frame, and never beside it:

- :mod:`.spec` — :class:`~.spec.Bench`, the one spec model: named rows, each a whole recipe (a base recipe plus the
  row's overrides), validated up front — a bad row is refused before anything runs, naming the row and the field.
  The shipped spec files keep their short forms (criteria × targets; methods × calibration sources; recovery rows;
  seeds to draw from): each is compiled into rows by its own module (:mod:`.grid`, :mod:`.tables`).
- :mod:`.execute` — the one executor: every row is ``prunelab.api.run`` (validate, preflight, ``runner.execute``),
  in this process, into ``<output_dir>/<name>/rows/<row>``. Resume is the runner's own (chained stage hashes; a row
  whose recipe changed re-runs from its first changed stage), sharding (``--shard I/N``) lives here once.
- :mod:`.cli` — ``prunelab bench SPEC`` (and ``python -m prunelab bench SPEC``).

The package's shell (not the frame, not a benchmark): ``api`` and ``cli`` (doors onto the frame), ``shipped``
(finding shipped recipes for those doors), ``runlog`` (run.log and the CLI's exit codes), ``rundir`` (run-directory
files: marker, atomic writes, done.json — the runner's storage) and ``metrics`` (metrics.json, the contract the
runner writes and benchmarks read). ``tests/test_layout.py`` holds the list and fails if a benchmark moves back.
"""

from __future__ import annotations

from prunelab.benchmarks.spec import Bench, BenchError, Row

__all__ = ["Bench", "BenchError", "Row"]
