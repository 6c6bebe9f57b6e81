"""The ``prunelab`` command (and ``python -m prunelab``), in the habits of torchtune's ``tune``:

    prunelab ls                          shipped recipes, one line each
    prunelab cp debug my-debug.yaml      copy one to edit
    prunelab validate my-debug.yaml      check it (schema, files, targets, model metadata); load nothing
    prunelab run my-debug.yaml [k=v ...] [--resume | --force] [--output-dir D] [--no-progress]
    prunelab bench bench/smollm2-20      a benchmark spec: rows of recipes through the runner (prunelab.benchmarks)
    prunelab version

``run`` and ``validate`` ARE ``python pipeline/run.py`` (the same ``main``, the same flags; ``validate`` adds
``--dry-run``), so ``accelerate launch pipeline/run.py RECIPE`` and ``prunelab run RECIPE`` never drift apart.
Wherever a recipe is expected, a shipped recipe's name (``debug``, ``smollm2/flap-20``) works too.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

COMMANDS = {
    "run": "run a recipe: load → calibrate → score → prune → (recover) → evaluate → export",
    "validate": "validate a recipe (run --dry-run): schema, files, targets against the model's metadata",
    "ls": "list the shipped recipes with a one-line description",
    "cp": "copy a shipped recipe to edit: prunelab cp NAME DEST",
    "bench": "run a benchmark spec: its rows as recipes through the runner, then its table (prunelab.benchmarks)",
    "version": "print prunelab's version and those of the libraries it runs on",
}


def _recipe_position(argv: list[str], takes_value: tuple[str, ...]) -> int | None:
    """Index of the recipe argument: the first token that is not a flag, a flag's value or an override."""
    skip = False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok.startswith("-"):
            skip = tok in takes_value
            continue
        if "=" not in tok:
            return i
    return None


def _delegate(main: Callable[[list[str]], int], argv: list[str], takes_value: tuple[str, ...] = ()) -> int:
    """Call ``main(argv)`` with a shipped recipe's name replaced by a file that holds it."""
    from prunelab.api import recipe_file  # lazy: startup
    from prunelab.recipe import RecipeError  # lazy: startup

    pos = _recipe_position(argv, takes_value)
    arg = argv[pos] if pos is not None else ""
    if pos is None or Path(arg).is_file() or (Path(arg).suffix in (".yaml", ".yml") and not _is_shipped(arg)):
        return main(argv)  # no recipe (argparse says so), a file, or a missing .yaml file (main reports it)
    try:
        with recipe_file(argv[pos]) as path:
            return main([*argv[:pos], str(path), *argv[pos + 1:]])
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _is_shipped(name: str) -> bool:
    from prunelab.shipped import ShippedRecipeError, find_recipe  # lazy: startup

    with contextlib.suppress(ShippedRecipeError):
        find_recipe(name)
        return True
    return False


def cmd_ls(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prunelab ls", description=COMMANDS["ls"])
    p.add_argument("--all", action="store_true", help="also the benchmark recipes (bench/...)")
    args = p.parse_args(argv)
    from prunelab.shipped import list_recipes, recipes_dir  # lazy: startup

    recipes = [r for r in list_recipes() if args.all or not r.name.startswith("bench/")]
    if not recipes:
        print("error: no shipped recipes found; reinstall prunelab", file=sys.stderr)
        return 2
    width = max(len(r.name) for r in recipes)
    print(f"{'RECIPE':<{width}}  DESCRIPTION")
    for r in recipes:
        print(f"{r.name:<{width}}  {r.description}")
    hidden = "" if args.all else " (benchmark recipes: prunelab ls --all)"
    print(f"\n{len(recipes)} recipes in {recipes_dir()}{hidden}; copy one to edit: prunelab cp NAME my.yaml")
    return 0


def cmd_cp(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="prunelab cp", description=COMMANDS["cp"])
    p.add_argument("name", help="a shipped recipe (prunelab ls), e.g. debug or smollm2/flap-20")
    p.add_argument("dest", help="the new file (.yaml) or a folder to put NAME.yaml in")
    p.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    args = p.parse_args(argv)
    from prunelab.shipped import ShippedRecipeError, copy_recipe  # lazy: startup

    try:
        target, replaced = copy_recipe(args.name, args.dest, force=args.force)
    except (ShippedRecipeError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"copied {args.name} → {target}")
    for rel, found in replaced:
        print(f"  {rel} → {found} (the shipped file; the relative path does not exist from here)")
    print(f"edit it, then: prunelab validate {target} && prunelab run {target}")
    return 0


def cmd_run(argv: list[str]) -> int:
    from prunelab.run import main  # lazy: startup

    return _delegate(main, argv, takes_value=("--output-dir",))


def cmd_validate(argv: list[str]) -> int:
    from prunelab.run import main  # lazy: startup

    return _delegate(main, [*argv, "--dry-run"], takes_value=("--output-dir",))


def cmd_bench(argv: list[str]) -> int:
    from prunelab.benchmarks.cli import main  # lazy: startup

    return _delegate(main, argv, takes_value=("--update-readme", "--shard", "--rows", "--output-dir", "--seeds",
                                              "--holdout", "--holdout-tokens", "--seq-len"))


def versions() -> dict[str, str]:
    """prunelab's version and the installed versions of what it runs on (package metadata: nothing imported)."""
    import prunelab as pipeline  # lazy: startup

    out = {"prunelab": pipeline.__version__}
    for dist in ("torch", "transformers", "accelerate", "peft", "huggingface_hub", "lm_eval", "bitsandbytes"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def cmd_version(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="prunelab version", description=COMMANDS["version"]).parse_args(argv)
    v = versions()
    print(f"prunelab {v.pop('prunelab')} (python {sys.version.split()[0]}; "
          + ", ".join(f"{k} {x}" for k, x in v.items()) + ")")
    return 0


HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "run": cmd_run, "validate": cmd_validate, "ls": cmd_ls, "cp": cmd_cp, "bench": cmd_bench, "version": cmd_version,
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return ("usage: prunelab {" + ",".join(COMMANDS) + "} ...\n\n"
            + "\n".join(f"  {k:<{width}}  {v}" for k, v in COMMANDS.items())
            + "\n\nprunelab COMMAND --help shows a command's arguments.")


def main(argv: list[str] | None = None) -> int:
    """``prunelab COMMAND ...``: each command parses its own arguments (``run``'s are ``pipeline/run.py``'s)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        return cmd_version([])
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        close = difflib.get_close_matches(command, list(HANDLERS), n=1)
        hint = f"; did you mean `prunelab {close[0]}`?" if close else ""
        print(f"error: unknown command {command!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    return HANDLERS[command](rest)


if __name__ == "__main__":
    sys.exit(main())
