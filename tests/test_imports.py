"""Function-level imports say why they are not at the top, and no module imports another's private names.

An import inside a function or method body hides a dependency from the reader and from the layout test's
picture of what loads what; it is allowed only where it buys something, and says what in a comment
``# lazy: <reason>`` on the import's line (any line of a parenthesized import) or on the comment line right
above it (such a line covers the unbroken run of imports below it). ``<reason>`` is one of:

- ``torch-free``: the importing module is read when a recipe (or a bench spec) is validated or ``--dry-run``
  prints it, or registers what validation reads; the target imports torch, transformers, peft or accelerate
  (``tests/test_recipes.py::test_dry_run_loads_nothing`` guards the path as a whole);
- ``optional``: the target may not be installed: an extra of pyproject (``lm_eval``, ``bitsandbytes``,
  ``deepspeed``, ``llama_cpp``, ``torch_pruning``) or an outside checkout (LLM-Pruner); the caller that needs
  it reports the missing package by name;
- ``startup``: a torch-free path (``import prunelab``, the ``prunelab`` command, recipe validation) that only
  some commands take would pay for a slow import (the recipe schema, ``huggingface_hub``, ``datasets``,
  ``matplotlib``) on every start;
- ``plugin``: the target is found by name at run time (a family's adapter, a registered variant);
- ``cycle``: the target imports this module at its top, so the import can only run once both are loaded
  (a cycle inside one package; the layout test forbids them between rooms).

A module that imports torch at its top anyway has no reason to defer another import: it goes at the top. The
``torch-free`` reason is checked against the top-level import graph (the module must stay torch-free, the target
must not); the others are read, not proven.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("pipeline", "stages")  # the package: prunelab = pipeline/, prunelab.stages = stages/
REASONS = frozenset({"torch-free", "optional", "startup", "plugin", "cycle"})
LAZY = re.compile(r"#\s*lazy:\s*(?P<reason>[A-Za-z_-]+)")


def module_name(path: Path, root: Path = ROOT) -> str:
    """``pipeline/x/y.py`` is ``prunelab.x.y``, ``stages/x/y.py`` is ``prunelab.stages.x.y`` (pyproject's package-dir)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    head = ["prunelab"] if parts[0] == "pipeline" else ["prunelab", "stages"]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(head + parts[1:])


def _comments(text: str) -> dict[int, str]:
    """Line → the comment on it (tokenize: a ``#`` inside a string is no comment)."""
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string
    return out


def _function_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement inside a function or method body (nested classes and functions included)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return sorted(found, key=lambda n: n.lineno)


def lazy_import_problems(path: Path, root: Path = ROOT) -> tuple[list[str], dict[str, int]]:
    """(each function-level import without a known reason, as ``file:line: ...``; the count of each reason)."""
    text = path.read_text(encoding="utf-8")
    comments = _comments(text)
    lines = text.splitlines()
    problems: list[str] = []
    counts: dict[str, int] = {}
    imports = _function_imports(ast.parse(text))
    ends = {node.end_lineno: node for node in imports}
    above: dict[ast.AST, str | None] = {}  # the reason a comment line above gave (it carries down a run of imports)
    for node in imports:
        where = f"{path.relative_to(root)}:{node.lineno}"
        own = [m["reason"] for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
               if (m := LAZY.search(comments.get(line, ""))) is not None]
        starts_line = not lines[node.lineno - 1][: node.col_offset].strip()
        above[node] = None
        line = node.lineno - 1
        while starts_line and line >= 1 and lines[line - 1].strip().startswith("#"):  # the comment lines above
            if (m := LAZY.search(comments.get(line, ""))) is not None:
                above[node] = m["reason"]
                break
            line -= 1
        prev = ends.get(node.lineno - 1)
        if starts_line and above[node] is None and prev is not None and prev.col_offset == node.col_offset:
            above[node] = above.get(prev)  # one statement of a run under a `# lazy:` line
        if own:  # an import with its own reason ends the run above it
            above[node] = None
        reason = own[0] if own else above[node]
        if reason is None:
            problems.append(f"{where}: `{ast.unparse(node)}` inside a function without `# lazy: <reason>`: move it "
                            f"to the top of the file, or give one of {sorted(REASONS)} (tests/test_imports.py)")
        elif reason not in REASONS:
            problems.append(f"{where}: unknown lazy-import reason {reason!r}; use one of {sorted(REASONS)}")
        else:
            counts[reason] = counts.get(reason, 0) + 1
    return problems, counts


def _imported_module(node: ast.ImportFrom, me: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = me.split(".") if is_package else me.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_import_problems(path: Path, root: Path = ROOT) -> list[str]:
    """``from prunelab.x import _name`` (or ``import prunelab.x._mod``) anywhere in a module other than ``x``: a
    private name is the defining module's own business; what others need is public, under a public name."""
    me = module_name(path, root)
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom):
            source = _imported_module(node, me, path.name == "__init__.py")
            if not source.startswith("prunelab") or source == me:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    problems.append(f"{where}: imports the private name {alias.name!r} from {source}; make it public "
                                    f"there (or move the code that needs it into {source})")
            if any(p.startswith("_") and not p.startswith("__") for p in source.split(".")):
                problems.append(f"{where}: imports from the private module {source}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "prunelab" and any(p.startswith("_") and not p.startswith("__") for p in parts):
                    problems.append(f"{where}: imports the private module {alias.name}")
    return problems


def package_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (root / d).rglob("*.py"))


HEAVY = ("torch", "transformers", "peft", "accelerate", "safetensors.torch", "bitsandbytes", "deepspeed")


def _is_heavy_name(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HEAVY)


def top_level_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module → every module its top level imports (outside functions and ``TYPE_CHECKING``), parents included."""
    files = {module_name(p, root): p for p in package_files(root)}
    graph: dict[str, set[str]] = {}
    for me, path in files.items():
        out: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stack = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    _imported_module(node, me, path.name == "__init__.py")]
                if isinstance(node, ast.ImportFrom):
                    names += [f"{names[0]}.{a.name}" for a in node.names if f"{names[0]}.{a.name}" in files]
                for name in names:
                    parts = name.split(".")
                    out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                stack += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
        parts = me.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
        graph[me] = out
    return graph


def imports_torch(module: str, graph: dict[str, set[str]]) -> bool:
    """Whether importing ``module`` loads torch (or transformers, peft, accelerate) by its top-level imports."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if _is_heavy_name(m):
            return True
        todo += graph.get(m, ())
    return False


def torch_free_claim_problems(path: Path, graph: dict[str, set[str]], root: Path = ROOT) -> list[str]:
    """A ``torch-free`` reason must hold: the importing module stays torch-free at its top, and the target does not."""
    me = module_name(path, root)
    text = path.read_text(encoding="utf-8")
    comments = _comments(text)
    problems = []
    for node in _function_imports(ast.parse(text)):
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        if not any((m := LAZY.search(comments.get(n, ""))) and m["reason"] == "torch-free" for n in lines):
            continue  # only a reason on the import's own line is checked (a `# lazy:` line above may cover others)
        target = node.names[0].name if isinstance(node, ast.Import) else _imported_module(
            node, me, path.name == "__init__.py")
        targets = [target] + ([f"{target}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else [])
        where = f"{path.relative_to(root)}:{node.lineno}"
        if imports_torch(me, graph):
            problems.append(f"{where}: `# lazy: torch-free`, but {me} imports torch at its top anyway: move the "
                            "import to the top")
        elif not any(imports_torch(t, graph) for t in targets if t in graph or _is_heavy_name(t)):
            problems.append(f"{where}: `# lazy: torch-free`, but {target} does not import torch: move the import to "
                            "the top (or give the reason that holds)")
    return problems


def test_every_function_level_import_gives_its_reason() -> None:
    problems: list[str] = []
    counts: dict[str, int] = {}
    for path in package_files():
        found, per_reason = lazy_import_problems(path)
        problems += found
        for reason, n in per_reason.items():
            counts[reason] = counts.get(reason, 0) + n
    assert not problems, f"{len(problems)} function-level imports without a reason:\n" + "\n".join(problems)
    assert counts, "the walk found no function-level import at all: is it looking at the package?"


def test_a_torch_free_reason_holds() -> None:
    """The commonest reason is checked, not taken on trust: the module keeps torch out of its top-level imports and
    the deferred target brings it in."""
    graph = top_level_graph()
    problems = [p for path in package_files() for p in torch_free_claim_problems(path, graph)]
    assert not problems, f"{len(problems)} `torch-free` reasons that do not hold:\n" + "\n".join(problems)


def test_no_private_name_is_imported_across_modules() -> None:
    problems = [p for path in package_files() for p in private_import_problems(path)]
    assert not problems, "\n".join(problems)


PLANTED = '''\
"""A planted module."""
from prunelab.stages.io.sources import _private_helper
from prunelab.stages import _hidden as fine_alias_but_private_source
import prunelab.stages.core._internal


def _own() -> int:
    return 1


def f():
    import json
    from prunelab.stages.arch import adapter_for  # lazy: torch-free (read at --dry-run)
    from prunelab.stages.io.text import load_text  # lazy: because
    # lazy: optional
    import lm_eval
    import bitsandbytes
    from os import (  # lazy: startup
        path,
    )
    from . import _own as ok_same_module  # a private name of this very module's package is still foreign
    x = "# lazy: torch-free"; import yaml
    return json, adapter_for, load_text, lm_eval, bitsandbytes, path, ok_same_module, x, yaml
'''


def test_the_checks_fail_on_planted_imports(tmp_path: Path) -> None:
    """Not vacuous: each kind of problem planted in a module laid out like the package is reported, with its line;
    the accepted spellings are accepted."""
    path = tmp_path / "stages" / "io" / "planted.py"
    path.parent.mkdir(parents=True)
    path.write_text(PLANTED)
    problems, counts = lazy_import_problems(path, tmp_path)
    assert [p.split(": ", 1)[0] for p in problems] == ["stages/io/planted.py:12", "stages/io/planted.py:14",
                                                       "stages/io/planted.py:21", "stages/io/planted.py:22"], problems
    assert "without `# lazy: <reason>`" in problems[0] and "import json" in problems[0]
    assert "unknown lazy-import reason 'because'" in problems[1]
    assert "import yaml" in problems[3]  # a reason inside a string on the line does not count
    assert counts == {"torch-free": 1, "optional": 2, "startup": 1}
    private = private_import_problems(path, tmp_path)
    assert any(":2:" in p and "'_private_helper'" in p for p in private), private
    assert any(":3:" in p and "'_hidden'" in p for p in private), private
    assert any(":4:" in p and "prunelab.stages.core._internal" in p for p in private), private
    assert any(":21:" in p and "'_own'" in p for p in private), private
    heavy = tmp_path / "stages" / "io" / "heavy.py"
    heavy.write_text("import torch\n\n\ndef g():\n    import transformers  # lazy: torch-free\n")
    light = tmp_path / "stages" / "io" / "light.py"
    light.write_text("def h():\n    import torch  # lazy: torch-free\n    from prunelab.stages.io.heavy import g  # lazy: torch-free\n")
    graph = top_level_graph(tmp_path)
    claims = torch_free_claim_problems(path, graph, tmp_path) + torch_free_claim_problems(heavy, graph, tmp_path)
    assert [c.split(": ", 1)[0] for c in claims] == ["stages/io/planted.py:13", "stages/io/heavy.py:5"], claims
    assert "does not import torch" in claims[0] and "imports torch at its top anyway" in claims[1]
    assert torch_free_claim_problems(light, graph, tmp_path) == []  # both hold


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_reason_is_documented(reason: str) -> None:
    assert f"``{reason}``" in (__doc__ or "")
