"""The recipes that ship with prunelab: find them by name, describe them, copy one to edit.

Where they live depends on how prunelab is installed, and nothing else should care:

- in a checkout (``pip install -e .`` or ``python pipeline/run.py``), the repository's ``recipes/`` folder;
- in a wheel, the package data of ``prunelab.recipes`` (read through :mod:`importlib.resources`).

A recipe is named by its path below that folder without ``.yaml``: ``debug``, ``smollm2/flap-20``.

Shipped recipes name their small data files relative to the repository root (``tests/data/tiny_corpus.txt``), as
``python pipeline/run.py recipes/debug.yaml`` run from the root expects. Outside the root those paths do not
exist, so :func:`recipe_text` rewrites each one that does not resolve from the working directory to the absolute
path of the shipped copy (the checkout's file, or the wheel's ``prunelab/recipes/data/``). Nothing here imports
torch: ``prunelab ls`` answers at once.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The import name of the recipes package in an installed wheel (the lead's rename maps recipes/ to it).
RECIPES_PACKAGE = "prunelab.recipes"
# Relative paths in shipped recipes → where a wheel keeps the file, below the recipes package folder.
SHIPPED_DATA = {"tests/data/": "data/"}


class ShippedRecipeError(LookupError):
    """A recipe name that is not shipped, with the close matches and how to list them."""


@dataclass(frozen=True)
class ShippedRecipe:
    name: str  # e.g. "smollm2/flap-20"
    path: Path  # the YAML file (a real file: checkout folder or the installed package's folder)

    @property
    def description(self) -> str:
        return describe_text(self.path.read_text(encoding="utf-8"))


def recipes_dir() -> Path | None:
    """The folder holding the shipped recipes: the checkout's ``recipes/`` when prunelab runs from a checkout,
    else the installed ``prunelab.recipes`` package; None when neither exists."""
    if (ROOT / "recipes" / "debug.yaml").is_file() and (ROOT / "pyproject.toml").is_file():
        return ROOT / "recipes"
    beside = Path(__file__).resolve().parent / "recipes"  # the wheel: prunelab/recipes next to this module
    if beside.is_dir():
        return beside
    try:
        files = importlib.resources.files(RECIPES_PACKAGE)
    except (ModuleNotFoundError, TypeError):
        return None
    folder = Path(str(files))
    return folder if folder.is_dir() else None


def list_recipes() -> list[ShippedRecipe]:
    """Every shipped recipe, sorted by name (top-level first, then folders)."""
    folder = recipes_dir()
    if folder is None:
        return []
    found = [ShippedRecipe(p.relative_to(folder).with_suffix("").as_posix(), p) for p in folder.rglob("*.yaml")
             if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)]
    return sorted(found, key=lambda r: (r.name.count("/"), r.name))


def find_recipe(name: str) -> ShippedRecipe:
    """The shipped recipe called ``name`` (``debug``, ``smollm2/flap-20``; a trailing ``.yaml`` or a leading
    ``recipes/`` is accepted); :class:`ShippedRecipeError` with close matches otherwise."""
    key = name.removeprefix("recipes/").removesuffix(".yaml").removesuffix(".yml")
    recipes = {r.name: r for r in list_recipes()}
    if key in recipes:
        return recipes[key]
    if not recipes:
        raise ShippedRecipeError(f"no shipped recipes found (looked in {ROOT / 'recipes'} and the package "
                                 f"{RECIPES_PACKAGE}); reinstall prunelab")
    close = difflib.get_close_matches(key, list(recipes), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ShippedRecipeError(f"{name!r} is neither a recipe file nor a shipped recipe; {hint}"
                             f"`prunelab ls` lists the {len(recipes)} shipped recipes")


def describe_text(text: str) -> str:
    """One line from a recipe's leading comment: the first sentence of its first prose paragraph (the lines
    that show how to run it, ``# python …`` / ``# accelerate launch …``, are skipped)."""
    prose: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if re.match(r"^(\w+=\S+\s+)*(python|accelerate|torchrun|prunelab|deepspeed)\b", body):
            continue
        if not body:
            if prose:
                break
            continue
        prose.append(body)
    sentence = " ".join(prose)
    for cut in re.finditer(r"\.\s", sentence):  # a sentence ends at ". " — not after "et al." / "Sec." / "e.g."
        if not re.search(r"(\bal|\bSec|\be\.g|\bi\.e|\bvs|\bcf|\bEq|\bFig)$", sentence[: cut.start()]):
            sentence = sentence[: cut.start()]
            break
    return sentence if len(sentence) <= 100 else sentence[:99].rstrip() + "…"


def shipped_file(rel: str) -> Path | None:
    """The shipped copy of a data file a shipped recipe names relative to the repository root, or None."""
    if (ROOT / rel).is_file() and (ROOT / "pyproject.toml").is_file():
        return ROOT / rel
    folder = recipes_dir()
    for prefix, inside in SHIPPED_DATA.items():
        if folder is not None and rel.startswith(prefix) and (folder / inside / rel[len(prefix):]).is_file():
            return folder / inside / rel[len(prefix):]
    return None


_PATHLIKE = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]+\.(?:txt|jsonl|json))(?![\w/])")


def recipe_text(recipe: ShippedRecipe, cwd: Path | None = None) -> tuple[str, list[tuple[str, Path]]]:
    """The recipe's YAML with every relative data path that does not exist from ``cwd`` but is shipped replaced
    by the shipped file's absolute path; also the list of (relative, absolute) replacements made. Run from the
    repository root the text is returned unchanged."""
    cwd = Path.cwd() if cwd is None else cwd
    text = recipe.path.read_text(encoding="utf-8")
    done: list[tuple[str, Path]] = []
    for rel in sorted(set(_PATHLIKE.findall(text))):
        if Path(rel).is_absolute() or (cwd / rel).is_file():
            continue
        found = shipped_file(rel)
        if found is not None:
            done.append((rel, found))
    for rel, found in done:
        text = re.sub(rf"(?<![\w./-]){re.escape(rel)}(?![\w/])", found.as_posix(), text)
    return text, done


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> tuple[Path, list[tuple[str, Path]]]:
    """``prunelab cp NAME DEST``: write the shipped recipe to ``dest`` (a file, or a folder to put ``NAME.yaml``
    in) with its data paths made to work from the working directory; refuse to overwrite unless ``force``."""
    recipe = find_recipe(name)
    target = Path(dest)
    if target.is_dir():
        target = target / f"{recipe.name.rsplit('/', 1)[-1]}.yaml"
    if target.suffix not in (".yaml", ".yml"):
        raise ValueError(f"{dest}: the copy needs a .yaml name (e.g. my-{recipe.name.rsplit('/', 1)[-1]}.yaml) or a folder")
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; choose another name or pass --force to overwrite it")
    text, replaced = recipe_text(recipe)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target, replaced
