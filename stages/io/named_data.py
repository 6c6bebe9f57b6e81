"""WikiText-2 and ARC by name: ``{dataset: wikitext2, split: test}`` / ``{dataset: arc-easy, split: test}``.

One documented way (docs/data.md) for the evaluation and calibration text every recipe uses, so a recipe runs the
same with or without a network:

1. a **local file** when one is present — under ``$PRUNELAB_DATA`` (folders separated by ``:``), ``../shared/data``
   from the working directory, or ``../shared/data`` beside the project — in the layout of the project's shared data
   (``wikitext2/test.txt``, ``wikitext2/valid.txt``, ``arc/arc_easy_test.jsonl``), checked against the
   ``SHA256SUMS`` beside it when there is one;
2. otherwise **``datasets.load_dataset``** of the same split on the Hub, which caches it (later runs read the cache,
   also offline);
3. otherwise (offline and not cached) a clear error, before any model loads, that names the fix.

Why local first: the local files are pinned by their checksums, so a perplexity measured today is comparable with one
measured next month whatever the Hub serves. The older spelling ``{dataset: wikitext, config: wikitext-2-raw-v1,
split: test}`` names the same data and resolves the same way (local file first); other datasets go to ``datasets``
as they always did. No torch and no ``datasets`` import here: preflight reads it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prunelab.stages.io.hub import network_state

WIKITEXT = "Salesforce/wikitext"  # the Hub's home of the old canonical name "wikitext"
ARC = "allenai/ai2_arc"


@dataclass(frozen=True)
class NamedSplit:
    """One split of a named dataset: where it lies locally (relative to a data folder) and on the Hub."""

    local: str | None  # e.g. "wikitext2/test.txt"; None: the Hub only
    hub: tuple[str, str, str]  # (datasets name, config, split) for datasets.load_dataset


@dataclass(frozen=True)
class NamedDataset:
    kind: Literal["text", "qa"]  # qa: rows rendered "Question: …\nAnswer: <gold choice>" (prunelab.stages.io.qa)
    splits: dict[str, NamedSplit]
    about: str


# The local files are the project's shared data (../shared/data/README.md): WikiText-2 test is the *raw* variant,
# its valid file the *tokenized* one (rare words as <unk>), so the Hub configs below are the ones that hold the same
# text. ARC's only local split is ARC-Easy test.
NAMED: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset("text", {
        "test": NamedSplit("wikitext2/test.txt", (WIKITEXT, "wikitext-2-raw-v1", "test")),
        "validation": NamedSplit("wikitext2/valid.txt", (WIKITEXT, "wikitext-2-v1", "validation")),
        "train": NamedSplit(None, (WIKITEXT, "wikitext-2-raw-v1", "train")),
    }, "WikiText-2 (Merity et al., 2016)"),
    "arc-easy": NamedDataset("qa", {
        "test": NamedSplit("arc/arc_easy_test.jsonl", (ARC, "ARC-Easy", "test")),
        "validation": NamedSplit(None, (ARC, "ARC-Easy", "validation")),
        "train": NamedSplit(None, (ARC, "ARC-Easy", "train")),
    }, "AI2 ARC-Easy (Clark et al., 2018), each question followed by its correct answer"),
    "arc-challenge": NamedDataset("qa", {
        s: NamedSplit(None, (ARC, "ARC-Challenge", s)) for s in ("test", "validation", "train")
    }, "AI2 ARC-Challenge, each question followed by its correct answer"),
}
NAME_ALIASES = {"wikitext-2": "wikitext2", "arc_easy": "arc-easy", "arc_challenge": "arc-challenge"}
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
LOCAL_BUILDERS = frozenset({"json", "text", "csv", "parquet", "arrow"})  # datasets builders that read data_files


@dataclass(frozen=True)
class Resolved:
    """Where a named (or recognised) dataset split is read from."""

    name: str  # the name in NAMED
    split: str
    kind: Literal["text", "qa"]
    local: Path | None  # the local file used, or None: the Hub through datasets
    hub: tuple[str, str, str]

    def describe(self) -> str:
        where = str(self.local) if self.local is not None else "datasets " + "/".join(self.hub)
        return f"{self.name} {self.split} ({where})"


def data_roots() -> list[Path]:
    """Folders searched for the local files, first match wins: $PRUNELAB_DATA, ../shared/data from the working
    directory (the recipes' own relative paths), ../shared/data beside the project."""
    roots = [Path(p).expanduser() for p in os.environ.get("PRUNELAB_DATA", "").split(os.pathsep) if p.strip()]
    roots += [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2].parent / "shared" / "data"]
    seen: list[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in [s.resolve() for s in seen]:
            seen.append(root)
    return seen


def _named(source: Any) -> tuple[str, str] | None:
    """(name in NAMED, split as written) when ``source`` names a known dataset: its short name, or the Hub name and
    config of one of its splits (``{dataset: wikitext, config: wikitext-2-raw-v1, split: test}``)."""
    dataset = getattr(source, "dataset", None)
    if not isinstance(dataset, str) or getattr(source, "data_files", None) is not None:
        return None
    name = NAME_ALIASES.get(dataset.lower(), dataset.lower())
    if name in NAMED:
        return name, source.split
    if getattr(source, "text_field", "text") != "text":
        return None
    short = dataset.split("/")[-1]
    for key, named in NAMED.items():
        for split, entry in named.splits.items():
            hub_name, config, hub_split = entry.hub
            if named.kind == "text" and short == hub_name.split("/")[-1] and source.config == config \
                    and normal_split(source.split) == hub_split:
                return key, split
    return None


def normal_split(split: str) -> str:
    """``valid`` / ``val`` / ``dev`` are ``validation``; other names as they are (lower case)."""
    s = split.strip().lower()
    return SPLIT_ALIASES.get(s, s)


def resolve(source: Any) -> Resolved | None:
    """Where ``source`` (a TextSource) is read from, or None when it is not a named dataset. Raises ValueError naming
    the setting when the split does not exist for that name."""
    found = _named(source)
    if found is None:
        return None
    name, split = found
    named = NAMED[name]
    key = normal_split(split)
    if key not in named.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; set split to one of {sorted(named.splits)} "
                         "(slices such as test[:10%] are not taken: use max_tokens or num_samples)")
    entry = named.splits[key]
    local = None
    if entry.local is not None:
        local = next((root / entry.local for root in data_roots() if (root / entry.local).is_file()), None)
    return Resolved(name, key, named.kind, local, entry.hub)


def datasets_cache() -> Path:
    """The ``datasets`` cache folder, read as datasets reads it (HF_DATASETS_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return Path(home).expanduser() / "datasets"


def datasets_cached(name: str, config: str | None) -> bool:
    """Whether the datasets cache holds a prepared ``name`` (``config``): its folder ``namespace___name/config``
    with a ``dataset_info.json`` below it (datasets' own layout; a partial download has none)."""
    ns, _, short = name.rpartition("/")
    folder = datasets_cache() / (f"{ns}___{short}" if ns else short)
    if config:
        folder = folder / config
    return folder.is_dir() and next(folder.rglob("dataset_info.json"), None) is not None


def fetch_command(hub: tuple[str, str | None, str]) -> str:
    name, config, split = hub
    args = ", ".join(repr(x) for x in (name, config) if x) + f", split={split!r}"
    return f"python -c \"import datasets; datasets.load_dataset({args})\""


def needs_hub(source: Any) -> bool:
    """Whether reading ``source`` goes through ``datasets`` and the Hub (or its cache): a dataset that is neither a
    local builder over ``data_files`` nor a named split with its local file here."""
    dataset = getattr(source, "dataset", None)
    if not isinstance(dataset, str) or (dataset.lower() in LOCAL_BUILDERS and source.data_files is not None):
        return False
    try:
        found = resolve(source)
    except ValueError:
        return False
    return found is None or found.local is None


def source_problems(source: Any, where: str, probe: bool) -> list[str]:
    """What keeps a TextSource's ``dataset`` from being read on this machine, said before a model loads: an unknown
    split of a named dataset, ``datasets`` not installed, or — offline (``HF_HUB_OFFLINE``, or ``probe`` and the hub
    unreachable) — a split that is neither local nor in the datasets cache."""
    dataset = getattr(source, "dataset", None)
    if not isinstance(dataset, str):
        return []
    if dataset.lower() in LOCAL_BUILDERS and getattr(source, "data_files", None) is not None:
        return []
    try:
        found = resolve(source)
    except ValueError as exc:
        return [f"{where}.split: {exc}"]
    if found is not None and found.local is not None:
        return []
    hub = found.hub if found is not None else (dataset, getattr(source, "config", None), source.split)
    what = found.describe() if found is not None else "the dataset " + ":".join(x for x in hub if x)
    if importlib.util.find_spec("datasets") is None:
        return [f"{where}: {what} is read through the `datasets` package, which is not installed; "
                "`pip install datasets`, or give a local file {path: …}"]
    if datasets_cached(hub[0], hub[1]):
        return []
    online, why = network_state(probe, datasets=True)
    if online:
        return []
    local = ""
    if found is not None and (entry := NAMED[found.name].splits[found.split]).local is not None:
        local = (f"put the file at <data folder>/{entry.local} (the data folders searched: $PRUNELAB_DATA, "
                 "../shared/data; docs/data.md), ")
    return [f"{where}: {what} is not on this machine (no local file, not in the datasets cache "
            f"{datasets_cache()}) and {why}; {local}give a local file {{path: …}}, or fetch it once where there is "
            f"a network with `{fetch_command(hub)}` (later runs read the cache, offline too)"]


_TEST = re.compile(r"(^|[^a-z])test([^a-z]|$)")


def test_split_of(source: Any) -> str | None:
    """What marks ``source`` as test text (None: it is not): a ``dataset`` split ``test`` (``test[:…]`` too) or a
    local file whose name says test (``test.txt``, ``arc_easy_test.jsonl``)."""
    dataset = getattr(source, "dataset", None)
    if isinstance(dataset, str) and normal_split(source.split).split("[")[0] == "test":
        return f"split {source.split!r} of {dataset}"
    files = getattr(source, "data_files", None)
    for path in [getattr(source, "path", None), *(files if isinstance(files, list) else [files])]:
        if isinstance(path, str) and _TEST.search(Path(path).stem.lower()):
            return f"the file {path!r} (its name says test)"
    return None
