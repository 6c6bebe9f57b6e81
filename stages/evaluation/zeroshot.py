"""Zero-shot tasks through lm-evaluation-harness, on the in-memory model — any task lm-eval knows.

- **Metrics are read from what the task reports**: every ``metric,filter`` entry of lm-eval's results (``acc``,
  ``acc_norm``, ``exact_match``, ``f1``, …) with its ``_stderr``. BoolQ and WinoGrande report ``acc`` only; a
  generative task reports ``exact_match,strict-match``; each is stored under its own name (a filter other than
  ``none`` is kept: ``exact_match,strict-match``), so no task is assumed to look like ARC.
- **Task names are checked at --dry-run** (:func:`task_problems`, called by ``pipeline.preflight``): lm-eval's
  ``TaskManager`` needs ~7 s to index its ~15k tasks, so the names (and each task's hub dataset) are cached per
  lm-eval version in ``$PRUNELAB_CACHE/lm_eval_tasks-<version>.json``; a check then takes milliseconds and a
  misspelling gets the close match (``arc_eazy`` → ``arc_easy``). Offline (``HF_HUB_OFFLINE`` /
  ``HF_DATASETS_OFFLINE``), a hub task whose dataset is not in the local cache is refused with the fix.
- **Offline ARC-Easy**: a local JSONL runs through lm-eval's own ``json`` builder with the same prompt, choices and
  metrics as lm-eval's ``arc_easy`` task (``tasks/arc/arc_easy.yaml``), so the scoring is lm-eval's, not ours.
- **The preset** :data:`ZEROSHOT_SUITE` (``tasks: zeroshot_suite`` in an evaluate stage): ARC-e, ARC-c, HellaSwag,
  PIQA, WinoGrande, BoolQ, OpenBookQA, as the pruning papers report them; :func:`suite_availability` says which of
  them this machine can run offline (``python -m prunelab.stages.evaluation.zeroshot`` prints it).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from prunelab.stages.core.files import cache_root

# lm-eval 0.4's arc_easy.yaml with the hub dataset swapped for a local file.
ARC_EASY_LOCAL = {
    "task": "arc_easy_local",
    "dataset_path": "json",
    "output_type": "multiple_choice",
    "test_split": "train",  # the json builder names its one split "train"; the file is ARC-Easy *test*
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
    "metadata": {"version": 1.0},
}
LOCAL_TASKS = {"arc_easy": ARC_EASY_LOCAL}

# The usual zero-shot suite of the structured-pruning papers (LLM-Pruner, SliceGPT, ShortGPT, FLAP report these),
# lm-eval's task names; the settings are an evaluate stage's ``tasks:`` entries (lm-eval's hub tasks).
ZEROSHOT_SUITE: dict[str, dict[str, Any]] = {
    name: {"batch_size": 16} for name in
    ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa")
}
PRESETS = {"zeroshot_suite": ZEROSHOT_SUITE}
INDEX_SECONDS = 7  # what building lm-eval 0.4.13's TaskManager took here: the reason for the cache


def expand_preset(tasks: Any) -> Any:
    """``tasks: zeroshot_suite`` (a preset's name) → its entries; a mapping is returned as it is."""
    if isinstance(tasks, str):
        if tasks not in PRESETS:
            close = difflib.get_close_matches(tasks, list(PRESETS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"tasks: {tasks!r} is not a preset{hint}; presets: {', '.join(PRESETS)}, or a mapping "
                             "task name → settings")
        return {name: dict(cfg) for name, cfg in PRESETS[tasks].items()}
    return tasks


# ----------------------------------------------------------------------------- task names, cached
def _lm_eval_version() -> str | None:
    """lm-eval's version from its metadata (importing it takes ~1 s); None when it cannot be imported."""
    try:
        return version("lm_eval") if importlib.util.find_spec("lm_eval") is not None else None
    except (PackageNotFoundError, ImportError, ValueError):
        return None


def _index_file(ver: str) -> Path:
    return cache_root() / f"lm_eval_tasks-{ver}.json"


def task_index() -> dict[str, str | None] | None:
    """lm-eval's task, group and tag names → the hub dataset each task reads (None for groups/tags); None when
    lm-eval is not installed. Built once per lm-eval version (~7 s), then read from the cache file."""
    ver = _lm_eval_version()
    if ver is None:
        return None
    path = _index_file(ver)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a broken cache file is rebuilt
    from lm_eval.tasks import TaskManager  # lazy: optional

    index: dict[str, str | None] = {}
    for name, entry in TaskManager().task_index.items():
        cfg = getattr(entry, "cfg", None) or {}
        index[name] = cfg.get("dataset_path") if isinstance(cfg, dict) else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, sort_keys=True))
    tmp.replace(path)
    return index


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def dataset_cached(dataset: str) -> bool:
    """Whether a hub dataset has files in the local caches (the hub's and datasets'), without the network."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    ds = Path(os.environ.get("HF_DATASETS_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets")
    return (hub / f"datasets--{dataset.replace('/', '--')}").is_dir() or any(ds.glob(f"{dataset.replace('/', '___')}*"))


def task_problems(tasks: dict[str, Any], where: str) -> list[str]:
    """Problems with the lm-eval tasks one evaluate stage names (``where`` = ``stages.<key>.tasks``): lm-eval not
    installed, an unknown task name (with the close match), or offline a hub task whose dataset is not cached."""
    hub = [name for name, cfg in tasks.items() if getattr(cfg, "path", None) is None]
    local = [name for name in tasks if name not in hub]
    if not tasks:
        return []
    index = task_index() if hub else ({} if _lm_eval_version() else None)  # local tasks need no index
    if index is None:
        return [f"{where}: zero-shot tasks run through lm-evaluation-harness, which is not installed; "
                "pip install 'prunelab[eval]' (or drop the tasks)"]
    problems = []
    for name in hub:
        if name not in index:
            close = difflib.get_close_matches(name, list(index), n=3, cutoff=0.75)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            problems.append(f"{where}.{name}: lm-eval {_lm_eval_version()} has no task {name!r}; {hint}"
                            "`lm-eval ls tasks` lists them")
        elif _offline() and index[name] and not dataset_cached(str(index[name])):
            problems.append(f"{where}.{name}: offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and lm-eval's dataset "
                            f"{index[name]} is not in the local cache; run once online to download it, or drop the task"
                            + (f", or give `path:` a local JSONL ({sorted(LOCAL_TASKS)})" if name in LOCAL_TASKS else ""))
    problems += [f"{where}.{name}: local files are supported for {sorted(LOCAL_TASKS)}" for name in local
                 if name not in LOCAL_TASKS]
    return problems


def recipe_task_problems(recipe: Any) -> list[str]:
    """:func:`task_problems` for every evaluate stage of a recipe (the preflight hook)."""
    return [p for key, cfg in recipe.stages.items() if getattr(cfg, "type", None) == "evaluate" and getattr(cfg, "tasks", None)
            for p in task_problems(cfg.tasks, f"stages.{key}.tasks")]


def suite_availability(tasks: dict[str, Any] | None = None) -> dict[str, str]:
    """For each task of the preset (or ``tasks``): where its data would come from on this machine — a local file, the
    local hub cache, or a download (unavailable offline)."""
    index = task_index() or {}
    out = {}
    for name, cfg in (tasks or ZEROSHOT_SUITE).items():
        path = cfg.get("path") if isinstance(cfg, dict) else getattr(cfg, "path", None)
        dataset = index.get(name)
        if path:
            out[name] = f"local file {path}" + ("" if Path(path).is_file() else " (MISSING)")
        elif dataset is None:
            out[name] = "unknown to lm-eval" if name not in index else "a group of tasks"
        elif dataset_cached(dataset):
            out[name] = f"hub dataset {dataset}, in the local cache"
        else:
            out[name] = f"hub dataset {dataset}, NOT in the local cache: needs a download" + (" (offline now)" if _offline() else "")
    return out


# ----------------------------------------------------------------------------- running a task
def task_manager(name: str, path: str | None, folder: Path, include_path: str | Path | None = None) -> tuple[Any, str]:
    """An lm-eval TaskManager that knows the local variant of ``name`` (when ``path`` is given) and the task
    YAMLs in ``include_path`` (your own tasks)."""
    from lm_eval.tasks import TaskManager  # lazy: optional

    if path is None:
        return TaskManager(include_path=str(include_path) if include_path else None), name
    if name not in LOCAL_TASKS:
        raise ValueError(f"no local definition for task {name!r}; local files are supported for {sorted(LOCAL_TASKS)}")
    spec = dict(LOCAL_TASKS[name], dataset_kwargs={"data_files": {"train": str(Path(path).resolve())}})
    (folder / f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    includes = [str(folder)] + ([str(include_path)] if include_path else [])
    return TaskManager(include_path=includes), spec["task"]


def _number(v: Any) -> float | None:
    """lm-eval writes ``"N/A"`` for a stderr it could not compute (one sample, bootstrap off)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def read_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's per-task results → ``{metric: value, metric_stderr: value}`` for every metric the task reported.

    Keys are ``"<metric>,<filter>"``; the filter ``none`` (log-likelihood tasks) is dropped from the name, any other
    (``exact_match,strict-match``) is kept, so two filters of one metric never collide."""
    out: dict[str, float | None] = {}
    for key, value in res.items():
        if "," not in key:
            continue  # "alias", "samples", …
        metric, filt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        name = metric if filt == "none" else f"{metric},{filt}"
        out[name] = _number(value)
        out[f"{name}_stderr"] = _number(res.get(f"{metric}_stderr,{filt}"))
    return out


def evaluate_task(model: Any, tokenizer: Any, name: str, path: str | None, limit: int | None, batch_size: int,
                  num_fewshot: int = 0, seed: int = 0, include_path: str | Path | None = None) -> dict[str, Any]:
    """Run one lm-eval task on ``model``: every metric it reports with its stderr (``metrics`` lists their names, in
    lm-eval's order), the sample count, the versions and the protocol in words."""
    try:
        import lm_eval  # lazy: optional
    except ImportError as exc:
        raise ImportError(f"zero-shot task {name!r} runs through lm-evaluation-harness, which is not installed: "
                          "pip install 'prunelab[eval]'") from exc
    from lm_eval import simple_evaluate  # lazy: optional
    from lm_eval.models.huggingface import HFLM  # lazy: optional

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        manager, task = task_manager(name, path, Path(tmp), include_path)
        out = simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                              bootstrap_iters=1000, log_samples=False)
    metrics = read_metrics(out["results"][task])
    if not metrics:
        raise RuntimeError(f"lm-eval task {name!r} reported no metrics ({sorted(out['results'][task])})")
    n = out.get("n-samples", {}).get(task, {}).get("effective")
    names = [k for k in metrics if not k.endswith("_stderr")]
    version = getattr(lm_eval, "__version__", "unknown")
    notes = {"acc": "acc = raw log-likelihood", "acc_norm": "acc_norm = length-normalised"}
    return {
        **metrics, "metrics": names,
        "samples": n, "num_fewshot": num_fewshot, "source": path or name, "lm_eval_version": version,
        "protocol": f"lm-eval {version} {name} {num_fewshot}-shot, {n} questions from {path or name}; "
                    + "; ".join([notes[m] for m in names if m in notes] or [", ".join(names)]),
    }


def describe_task(r: dict[str, Any]) -> str:
    """One line for a task result: each metric (± stderr), the sample count and lm-eval's version."""
    names = r.get("metrics") or [k for k in ("acc", "acc_norm") if k in r]
    parts = []
    for m in names:
        v, err = r.get(m), r.get(f"{m}_stderr")
        parts.append(f"{m} {v:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else "") if isinstance(v, float) else f"{m} {v}")
    return "  ".join(parts) + f"  ({r.get('samples')} questions, lm-eval {r.get('lm_eval_version')})"


if __name__ == "__main__":  # python -m prunelab.stages.evaluation.zeroshot: where the preset's data would come from here
    for task, where in suite_availability().items():
        print(f"{task:14s} {where}")
