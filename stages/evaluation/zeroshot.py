"""Zero-shot multiple-choice tasks through lm-evaluation-harness, on the in-memory model.

Offline, ARC-Easy runs from a local JSONL through lm-eval's own ``json`` dataset builder with the
same prompt, choices and metrics as lm-eval's ``arc_easy`` task (``tasks/arc/arc_easy.yaml``), so
the scoring is lm-eval's, not ours. Both ``acc`` (raw log-likelihood argmax) and ``acc_norm``
(byte-length-normalised) are reported under those names: papers mix them up.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

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


def task_manager(name: str, path: str | None, folder: Path) -> tuple[Any, str]:
    """An lm-eval TaskManager that knows the local variant of ``name`` (when ``path`` is given)."""
    from lm_eval.tasks import TaskManager

    if path is None:
        return TaskManager(), name
    if name not in LOCAL_TASKS:
        raise ValueError(f"no local definition for task {name!r}; local files are supported for {sorted(LOCAL_TASKS)}")
    spec = dict(LOCAL_TASKS[name], dataset_kwargs={"data_files": {"train": str(Path(path).resolve())}})
    (folder / f"{spec['task']}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return TaskManager(include_path=str(folder)), spec["task"]


def evaluate_task(model: Any, tokenizer: Any, name: str, path: str | None, limit: int | None, batch_size: int,
                  num_fewshot: int = 0, seed: int = 0) -> dict[str, Any]:
    """Run one lm-eval task on ``model``; return acc / acc_norm with stderr, the sample count and versions."""
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        manager, task = task_manager(name, path, Path(tmp))
        out = simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                              bootstrap_iters=1000, log_samples=False)
    res = out["results"][task]
    n = out.get("n-samples", {}).get(task, {}).get("effective")
    return {
        "acc": res["acc,none"], "acc_stderr": res.get("acc_stderr,none"),
        "acc_norm": res["acc_norm,none"], "acc_norm_stderr": res.get("acc_norm_stderr,none"),
        "samples": n, "num_fewshot": num_fewshot, "source": path or name,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "protocol": f"lm-eval {getattr(lm_eval, '__version__', '?')} {name} {num_fewshot}-shot, "
                    f"{n} questions from {path or name}; acc = raw log-likelihood, acc_norm = length-normalised",
    }
