"""Every file and module the documentation names exists: README.md and docs/*.md drift when code moves.

Checked: ``stages/…py``, ``pipeline/…py``, ``tests/…py``, ``launch/…`` and ``recipes/…yaml`` paths (from the
project root), and dotted ``prunelab.x.y`` names, which must be a module of the package (pyproject's package-dir:
``prunelab`` = pipeline/, ``prunelab.stages`` = stages/, ``prunelab.recipes`` = recipes/; ``stages.<room>.x`` is read as
``prunelab.stages.<room>.x``) or a name defined at the top of one (``prunelab.stages.io.loader.load_pruned``). A path with a placeholder (``stages/arch/<family>.py``)
or in capitals (``recipes/bench/NAME.yaml``) is a pattern, not a path, and is skipped, as are other projects' files (llama.cpp's ``src/llama-model.cpp``).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a path starts a token: not inside another path (``../shared/…``), a URL or a longer name
PATH = re.compile(r"(?<![\w./-])((?:stages|pipeline|tests|launch)/[\w/.-]*\.py|(?:recipes|launch)/[\w/.-]*\.yaml)"
                  r"(?![\w<*{-])")
PLACEHOLDER = re.compile(r"(?:^|/)[A-Z][A-Z_]*\.\w+$")  # recipes/bench/NAME.yaml
DOTTED = re.compile(r"(?<![\w./-])prunelab(?:\.[A-Za-z_]\w*)+(?![\w-])")
# ``stages.<room>.x`` names a library module (``stages.prune.units`` and the like are recipe keys: not checked)
ROOMS = sorted(p.name for p in (ROOT / "stages").iterdir() if (p / "__init__.py").is_file())
ROOM_DOTTED = re.compile(rf"(?<![\w./-])stages\.(?:{'|'.join(ROOMS)})(?:\.[A-Za-z_]\w*)+(?![\w-])")
# The commands that produced tables recorded before issue 27 (docs/results.md says so under its first heading): a
# number's provenance names the command as it was run, so these removed files may be named; nothing else may.
HISTORICAL = frozenset({"pipeline/bench.py", "pipeline/bench_calibration.py", "pipeline/bench_recovery.py",
                        "pipeline/select_draw.py"})
PACKAGE_DIRS = {"prunelab.recipes.data": "tests/data", "prunelab.recipes": "recipes", "prunelab.stages": "stages",
                "prunelab": "pipeline"}


def _module_file(name: str) -> Path | None:
    """The file of module ``name`` (``prunelab.x.y``), or None."""
    for prefix, folder in PACKAGE_DIRS.items():  # longest prefix first
        if name == prefix or name.startswith(prefix + "."):
            rest = name.removeprefix(prefix).lstrip(".").split(".") if name != prefix else []
            base = ROOT / folder / Path(*rest) if rest else ROOT / folder
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
            if base.is_dir():  # a data package (prunelab.recipes) has no __init__ in the tree
                return base
            return None
    return None


@cache
def _top_names(path: Path) -> frozenset[str]:
    """Names a module defines or imports at its top (what ``module.name`` can reach), ``__all__`` and the API names
    ``prunelab`` serves lazily included."""
    if path.is_dir():
        return frozenset(p.stem for p in path.iterdir())
    names: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node in tree.body:
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and node in tree.body:
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id in ("__all__", "_API") for t in targets):
                names.update(ast.literal_eval(node.value) if not isinstance(node.value, ast.Call)
                             else ast.literal_eval(node.value.args[0]))
    if "__getattr__" in names:  # a module-level __getattr__ serves the names it compares against (PEP 562)
        names.update(n.value for n in ast.walk(tree) if isinstance(n, ast.Compare)
                     for n in [n.left, *n.comparators] if isinstance(n, ast.Constant) and isinstance(n.value, str))
    return frozenset(names)


def dotted_exists(name: str) -> bool:
    """``prunelab.a.b.c``: a module, or a module followed by names defined in it (a class's method is not checked
    past the class)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        path = _module_file(".".join(parts[:cut]))
        if path is not None:
            return cut == len(parts) or parts[cut] in _top_names(path)
    return False


def broken_references(text: str, where: str) -> list[str]:
    """``where:line: name`` for each path or dotted name in ``text`` that does not exist."""
    bad = []
    for number, line in enumerate(text.splitlines(), 1):
        for m in PATH.finditer(line):
            if not PLACEHOLDER.search(m[1]) and m[1] not in HISTORICAL and not (ROOT / m[1]).exists():
                bad.append(f"{where}:{number}: {m[1]} does not exist")
        for m in [*DOTTED.finditer(line), *ROOM_DOTTED.finditer(line)]:
            if not dotted_exists(m[0] if m[0].startswith("prunelab") else f"prunelab.{m[0]}"):
                bad.append(f"{where}:{number}: {m[0]} is no module of the package nor a name in one")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_named_file_and_module_exists(doc: Path) -> None:
    bad = broken_references(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT)))
    assert not bad, "the documentation names what is not there (fix the doc, or the name moved):\n" + "\n".join(bad)


def test_the_check_fails_on_planted_wrong_paths() -> None:
    """Not vacuous: a wrong path or name of each kind is reported; right ones, patterns and outside files are not."""
    planted = ("see `stages/arch/lama.py` and pipeline/bench_rows.py, run `recipes/smollm2/flap-21.yaml`;\n"
               "tests/test_nothing.py, `prunelab.stages.io.loadr`, `prunelab.stages.io.loader.load_prunedd`,\n"
               "launch/nowhere.yaml `stages.io.tiny.tiny_famly`\n"
               "placeholders: recipes/bench/NAME.yaml, `launch/llamacpp_check.compare`\n"
               "fine: `stages/arch/llama.py`, `recipes/debug.yaml`, `prunelab.stages.io.loader.load_pruned`,\n"
               "`prunelab.benchmarks`, `prunelab.run`, `prunelab.recipes`, `stages/arch/<family>.py`, `stages.prune.units`,\n"
               "`stages.arch.SUBLAYER_FAMILIES` (served by the package's __getattr__), `stages.io.tiny`,\n"
               "`recipes/debug-<family>.yaml`, llama.cpp's `src/llama-model.cpp`, ../shared/DESIGN.md, prunelab[eval]\n")
    bad = broken_references(planted, "planted.md")
    named = [b.split(": ", 1)[1].split(" ")[0] for b in bad]
    assert named == ["stages/arch/lama.py", "pipeline/bench_rows.py", "recipes/smollm2/flap-21.yaml",
                     "tests/test_nothing.py", "prunelab.stages.io.loadr", "prunelab.stages.io.loader.load_prunedd",
                     "launch/nowhere.yaml", "stages.io.tiny.tiny_famly"], bad
    assert bad[0].startswith("planted.md:1:") and bad[-1].startswith("planted.md:3:")
