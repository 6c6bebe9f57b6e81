"""Fuzz over recipe fields and CLI overrides (issue 24, "what it must show"): values of the wrong type, range and
shape, drawn by a seeded generator (hypothesis is not a dependency), for every field of the debug recipes.

Each goes through ``pipeline.run.main([recipe, override, "--dry-run"])`` in-process: it must be accepted (exit 0)
or refused with exit 2 and an ``error:`` line — never a traceback, never an exception out of ``main``. A few that
``--dry-run`` accepts are then run for real, under the same rule. The slowest rejection is printed (``-s``), not
asserted: a test asserts behaviour, not a timing.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from prunelab.recipe import load_recipe
from prunelab.run import main

RECIPES = ["recipes/debug.yaml", "recipes/debug-recover.yaml", "recipes/debug-width.yaml"]
SEED = 24
CASES_PER_RECIPE = 70

# override values (OmegaConf dot-list syntax): wrong types, out-of-range numbers, wrong shapes, odd strings
BAD_VALUES = [
    "-1", "0", "1e308", "-1e308", "1e-9", "99999999999999999999", "nan", "inf", "-inf", "true", "false", "null",
    "''", "banana", "[]", "[1,2]", "[[1]]", "[0]", "[-1, 2]", "{a: 1}", "{}", "'~'", "../..", "/", "0x10", "1_000",
    "'é☃\u0000'", "'${oc.env:HOME}'", "'${now:}'", "x" * 300, "3.5", "'3'", "[true]", "{type: banana}",
]
# the real runs score with one cheap criterion (the fuzzed override comes after these and wins)
LIGHT = ["stages.score.criteria=[block_influence]", "stages.prune.criterion=block_influence",
         "stages.eval_dense.perplexity.tiny.max_tokens=512", "stages.eval_pruned.perplexity.tiny.max_tokens=512"]
EXTRA_PATHS = ["model", "stages", "name", "seed", "output_dir", "stages.prune", "stages.nonexistent",
               "stages.calibrate.nonexistent", "model.nonexistent", "stages.calibrate.source"]


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """Every dotted path of a resolved recipe, leaves and the mappings/lists above them."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:2]):
            out += _leaves(v, f"{prefix}.{i}")
    return out


def _cases() -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    cases = []
    for recipe in RECIPES:
        paths = sorted(set(_leaves(load_recipe(recipe).resolved()))) + EXTRA_PATHS
        for _ in range(CASES_PER_RECIPE):
            cases.append((recipe, f"{rng.choice(paths)}={rng.choice(BAD_VALUES)}"))
    return cases


def _call(capsys: pytest.CaptureFixture[str], argv: list[str], runs: bool = False) -> tuple[int, str, float]:
    """(exit code, output, wall seconds) of one CLI call; every answer of a --dry-run, and a real run's refusal
    (``runs``: the recipe may run for real, which takes longer), within 2 CPU seconds."""
    capsys.readouterr()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors exit 2 with a message, never a traceback
        rc = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 (the point of the test: nothing escapes main)
        pytest.fail(f"{argv}: {type(exc).__name__} escaped main: {exc}")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = capsys.readouterr()
    # the bar (issue 24): every rejection under 2 s — counted in this process's CPU seconds, so a neighbour on a
    # shared 2-core machine cannot fail it; the wall time is printed beside it
    assert cpu < 2.0 or (runs and rc == 0), f"{argv}: {cpu:.2f} CPU s (wall {seconds:.2f} s) before answering"
    return rc, out.out + out.err, seconds


def test_wrong_values_are_accepted_or_refused_never_a_traceback(capsys, tmp_path):
    refused, accepted, slowest, t0 = 0, [], (0.0, ""), time.perf_counter()
    for recipe, override in _cases():
        argv = [recipe, override, "--output-dir", str(tmp_path / "runs"), "--dry-run"]
        rc, text, seconds = _call(capsys, argv)
        assert "Traceback" not in text, f"{argv}:\n{text}"
        assert rc in (0, 2), f"{argv}: exit {rc}\n{text}"
        if rc == 2:
            refused += 1
            assert "error" in text, f"{argv}: refused without an error line\n{text}"
            slowest = max(slowest, (seconds, override))
        else:
            accepted.append((recipe, override))
    with capsys.disabled():
        print(f"\nfuzz: {refused} refused (slowest {slowest[0]:.2f}s: {slowest[1]!r}), {len(accepted)} accepted "
              f"in {time.perf_counter() - t0:.1f}s")
    assert refused > len(accepted), "the generator should mostly produce bad values"
    # a few accepted ones, run for real (debug.yaml only: seconds each)
    rng = random.Random(SEED)
    real = [c for c in accepted if c[0] == "recipes/debug.yaml" and not c[1].startswith(("output_dir", "name"))]
    for recipe, override in rng.sample(real, min(2, len(real))):
        argv = [recipe, *LIGHT, override, "--output-dir", str(tmp_path / "real"), "--no-progress", "--force"]
        rc, text, seconds = _call(capsys, argv, runs=True)
        with capsys.disabled():
            print(f"fuzz: full run {override!r}: exit {rc} in {seconds:.1f}s")
        assert "Traceback" not in text, f"{argv}:\n{text}"
        assert rc in (0, 2), f"{argv}: exit {rc}\n{text}"


@pytest.mark.parametrize("override", ["stages.calibrate.num_samples=true", "model=[1,2]", "stages.prune.num_blocks=1e308",
                                      "stages.calibrate.seq_len=-1", "stages.eval_pruned.speed={batch_sizes: [0]}",
                                      "model.device=banana", "output_dir=/dev/null"])
def test_issue_examples_refused_without_a_traceback(capsys, override):
    rc, text, _ = _call(capsys, ["recipes/debug.yaml", override, "--dry-run"])
    assert rc == 2 and "Traceback" not in text and "error" in text, text


def test_the_fuzz_cases_are_the_same_on_every_machine():
    assert _cases() == _cases() and len(_cases()) == len(RECIPES) * CASES_PER_RECIPE
    assert all(Path(r).is_file() for r in RECIPES)
