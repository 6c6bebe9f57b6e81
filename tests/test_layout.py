"""The house rules of DESIGN.md v2, checked on the source itself, and run directories of version 1 resuming.

Imports run one way: ``pipeline/`` (the frame) → ``stages/*.py`` (stage lifecycles) → ``stages/<room>/``
(the library). An AST walk over every module finds each import — at top level, inside functions, under
``TYPE_CHECKING`` — and names the ones that run the wrong way. Every check takes the root of a tree, so the tests
that prove a check is not vacuous plant their probes in a copy under ``tmp_path``, never in the checkout.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"


def stage_modules(root: Path = ROOT) -> set[str]:
    """``stages.<name>`` for every stage module (a file directly in ``stages/``) of the tree at ``root``."""
    return {f"stages.{p.stem}" for p in (root / "stages").glob("*.py") if p.stem != "__init__"}


def rooms(root: Path = ROOT) -> list[str]:
    """The rooms (packages directly in ``stages/``) of the tree at ``root``."""
    return sorted(p.name for p in (root / "stages").iterdir() if p.is_dir() and (p / "__init__.py").is_file())


STAGE_MODULES = stage_modules()
ROOMS = rooms()
# What a stage module may take from the frame: the registry it registers with, the context it types against.
FRAME_CORE = {"pipeline.registry", "pipeline.context"}
STAGE_LINE_LIMIT = 150


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _canonical(name: str) -> str:
    """The folder an imported name lives in: ``prunelab.stages.X`` is ``stages/X``, ``prunelab.X`` is
    ``pipeline/X`` (pyproject's package-dir), so the rules below speak of the folders."""
    if name == "prunelab.stages" or name.startswith("prunelab.stages."):
        return "stages" + name.removeprefix("prunelab.stages")
    if name == "prunelab" or name.startswith("prunelab."):
        return "pipeline" + name.removeprefix("prunelab")
    return name


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every imported module name (``from a.b import c`` gives ``a.b`` and ``a.b.c``), with its line, as a folder
    path (:func:`_canonical`)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return [(line, _canonical(name)) for line, name in out]


def _targets(name: str, stage_mods: set[str]) -> tuple[bool, bool]:
    """(is a stage module, is in pipeline/) for an imported name."""
    return name in stage_mods, name == "pipeline" or name.startswith("pipeline.")


def _violations(root: Path = ROOT) -> list[str]:
    """Every import in the tree at ``root`` that runs the wrong way, with its file and line."""
    bad = []
    stages, stage_mods = root / "stages", stage_modules(root)
    for path in sorted(list(stages.rglob("*.py")) + list((root / "pipeline").rglob("*.py"))):
        me = _module_name(path, root)
        in_room = path.parent != stages and path.is_relative_to(stages)
        for line, name in _imports(path):
            to_stage, to_frame = _targets(name, stage_mods)
            where = f"{path.relative_to(root)}:{line} imports {name}"
            if in_room and (to_stage or to_frame):
                bad.append(f"{where}: the library never imports a stage module or pipeline/")
            elif me in stage_mods and to_stage and name != me:
                bad.append(f"{where}: stages never import each other; move the shared code into a room")
            elif me in stage_mods and to_frame and not any(name == c or name.startswith(c + ".") for c in FRAME_CORE):
                bad.append(f"{where}: a stage takes only {sorted(FRAME_CORE)} from the frame")
            elif me.startswith("pipeline") and to_stage:
                bad.append(f"{where}: the frame reaches stage modules only through pipeline.registry")
    return bad


def test_imports_run_one_way() -> None:
    bad = _violations()
    assert not bad, "imports that run the wrong way:\n" + "\n".join(bad)


def _copy_of_the_tree(tmp_path: Path, *folders: str) -> Path:
    """The checkout's ``folders`` (sources only) copied under ``tmp_path``: a root to plant probes in."""
    for folder in folders:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def test_the_walk_catches_each_wrong_direction(tmp_path: Path) -> None:
    """The checker is not vacuous: one planted import of each forbidden kind (in a copy of the tree) is reported,
    and nothing else changes."""
    root = _copy_of_the_tree(tmp_path, "stages", "pipeline")
    before = set(_violations(root))
    planted = {
        "stages/io/_planted_probe.py": "from prunelab.rundir import atomic_write_json\n",
        "stages/core/_planted_probe2.py": "def f():\n    from prunelab.stages.prune import run\n",
        "stages/_planted_stage.py": "from prunelab.stages.score import run\nfrom prunelab.runner import run_recipe\n",
        "pipeline/_planted_frame.py": "from prunelab.stages.prune import run\n",
    }
    for rel, text in planted.items():
        (root / rel).write_text(text)
    new = sorted(set(_violations(root)) - before)
    expected = [("stages/io/_planted_probe.py:1 imports pipeline.rundir", "the library never imports"),
                ("stages/core/_planted_probe2.py:2 imports stages.prune", "the library never imports"),
                ("stages/_planted_stage.py:1 imports stages.score", "stages never import each other"),
                ("stages/_planted_stage.py:2 imports pipeline.runner", "a stage takes only"),
                ("pipeline/_planted_frame.py:1 imports stages.prune", "the frame reaches stage modules only")]
    for where, why in expected:
        assert any(b.startswith(where) and why in b for b in new), (where, new)
    assert all(any(n in b for n in ("_planted_probe", "_planted_stage", "_planted_frame")) for b in new), new


def room_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """room → {room it imports: [where, ...]} over every import in ``stages/<room>/`` of the tree at ``root`` (top
    level, in functions, under TYPE_CHECKING alike)."""
    stages, names = root / "stages", rooms(root)
    graph: dict[str, dict[str, list[str]]] = {room: {} for room in names}
    for path in sorted(stages.rglob("*.py")):
        if path.parent == stages:
            continue
        room = path.relative_to(stages).parts[0]
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] == "stages" and len(parts) > 1 and parts[1] in names and parts[1] != room:
                graph[room].setdefault(parts[1], []).append(f"{path.relative_to(root)}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (Tarjan): each is a set of rooms that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def room_cycles(root: Path = ROOT) -> list[str]:
    """Each pair of rooms in an import cycle of the tree at ``root``, with up to three of the imports that close it."""
    graph = room_graph(root)
    return [f"{a} → {b}: {', '.join(sorted(set(graph[a][b]))[:3])}" for group in cycles(graph) for a in group
            for b in group if b in graph[a]]


def test_rooms_import_without_cycles() -> None:
    """Rooms form a layering (core at the bottom): two rooms that import each other are one room or a misplaced module."""
    found = room_cycles()
    assert not found, "rooms that import each other:\n" + "\n".join(found)


def test_the_cycle_check_finds_a_planted_cycle(tmp_path: Path) -> None:
    """Not vacuous: in a copy of the tree, one function-level import planted in the lowest room (core) towards the
    highest (recovery) is reported as the cycle it closes, as are the cycles of a synthetic graph; a layering is not."""
    root = _copy_of_the_tree(tmp_path, "stages")
    assert not any(c.startswith("core → recovery") for c in room_cycles(root))
    (root / "stages" / "core" / "_planted_cycle.py").write_text("def f():\n    from prunelab.stages.recovery import config\n")
    found = room_cycles(root)
    assert "core → recovery: stages/core/_planted_cycle.py:2" in found, found
    assert any(c.startswith("recovery → core: ") for c in found), found
    synthetic = {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}, "e": {"f": []}, "f": {"e": []}}
    assert cycles(synthetic) == [["a", "b", "c"], ["e", "f"]]
    assert cycles({"a": {"b": []}, "b": {"c": []}, "c": {}}) == []


def test_every_room_is_a_package_and_every_stage_registers() -> None:
    from prunelab.registry import load_stages

    assert {"arch", "calibration", "criteria", "selection", "surgery", "recovery", "evaluation", "io", "core"} <= set(ROOMS)
    registered = set(load_stages().names())
    assert {m.removeprefix("stages.") for m in STAGE_MODULES} == registered


def test_stage_modules_are_short_or_say_why() -> None:
    """A stage file is a lifecycle (config + run + restore): ~150 lines, or a comment saying why it is longer."""
    long = []
    for path in STAGES.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > STAGE_LINE_LIMIT and "# longer than 150 lines because" not in text:
            long.append(f"{path.name}: {len(text.splitlines())} lines")
    assert not long, long


@pytest.mark.parametrize("name", ["debug", "debug-width", "debug-recover"])
def test_run_directory_of_version_1_resumes(tmp_path: Path, name: str) -> None:
    """Run directories made by the flat-schema version (commit 0f1500b, kept in tests/fixtures/v1-runs without
    model/ and checkpoints) resume from their own ``recipe.resolved.yaml``: every stage but load (always runs) and export (whose model/
    folder was left out) is restored, not run again, and the metrics keep their numbers."""
    from prunelab.run import main

    src = ROOT / "tests" / "fixtures" / "v1-runs" / name
    run_dir = tmp_path / name
    shutil.copytree(src, run_dir)
    before = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/done.json")}
    old_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert main([str(run_dir / "recipe.resolved.yaml"), "--resume", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    after = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/done.json")}
    rerun = sorted(k for k in before if after[k]["finished"] != before[k]["finished"])
    assert rerun == [k for k in sorted(before) if k.endswith(("-load", "-export"))], f"stages run again: {rerun}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval"] == old_metrics["eval"]
    assert metrics["model"] == old_metrics["model"]


# The frame runs ONE recipe (DESIGN.md, "The package and its API"; issue 27 item 2). Around it, the package's shell:
# the doors onto it (api, cli, __main__, shipped: finding a shipped recipe for those doors), the run directory's
# storage (rundir: marker, atomic writes, done.json; runlog: run.log and exit codes) and metrics.json, the contract
# the runner writes and benchmarks read. Benchmarks and tools live in pipeline/benchmarks/ (prunelab.benchmarks).
FRAME = {"run", "recipe", "runner", "registry", "context", "report", "preflight"}
SHELL = {"__init__", "__main__", "api", "cli", "shipped", "runlog", "rundir", "metrics"}


def _frame_problems(modules: set[str]) -> list[str]:
    """What in ``pipeline/*.py`` (by module stem) is neither the frame nor its shell."""
    return [f"pipeline/{m}.py: not the frame ({sorted(FRAME)}) nor its shell ({sorted(SHELL)}); a benchmark or tool "
            f"goes in pipeline/benchmarks/ (prunelab.benchmarks)" for m in sorted(modules - FRAME - SHELL)]


def test_the_frame_is_only_the_frame_and_its_shell() -> None:
    modules = {p.stem for p in (ROOT / "pipeline").glob("*.py")}
    assert not _frame_problems(modules), _frame_problems(modules)
    assert FRAME <= modules  # the list names real modules
    for name in ("bench", "bench_rows", "select_draw", "compare_llm_pruner"):  # a benchmark put back is named
        assert any(f"pipeline/{name}.py" in p for p in _frame_problems(modules | {name}))
    for stem in FRAME:  # the frame never reaches into the benchmarks that run on top of it
        bad = [n for _, n in _imports(ROOT / "pipeline" / f"{stem}.py") if n.startswith("pipeline.benchmarks")]
        assert not bad, f"pipeline/{stem}.py imports {bad}"
