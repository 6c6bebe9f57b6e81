"""``metrics.json``: the contract that benchmarks and checks read (see shared/DESIGN.md)."""

from __future__ import annotations

import platform
import resource
import sys
from typing import Any

TIMING_KEYS = ("calibrate", "score", "prune", "recover", "evaluate")


def peak_memory_mb() -> dict[str, float | None]:
    import torch

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"cpu_rss": round(rss_kb / 1024, 1), "gpu": round(gpu, 1) if gpu is not None else None}


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    import pipeline

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "prunelab": pipeline.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
    }


def build_metrics(ctx: Any) -> dict[str, Any]:
    info = ctx.model_info
    plan = ctx.plan or {}
    timing = {k: round(ctx.timings.get(k, 0.0), 3) for k in TIMING_KEYS}
    timing.update({k: round(v, 3) for k, v in ctx.timings.items() if k not in timing})
    return {
        "recipe": ctx.recipe.name,
        "model": {
            "source": info.get("source"),
            "params_before": info.get("params_before"),
            "params_after": info.get("params_after", info.get("params_before")),
            "layers_before": info.get("layers_before"),
            "layers_after": info.get("layers_after", info.get("layers_before")),
        },
        "eval": ctx.evals,
        "plan": {
            "kind": plan.get("kind"),
            "criterion": plan.get("criterion"),
            "removed_blocks": plan.get("removed_blocks", []),
            "removed_units": plan.get("num_removed", 0),
            "achieved_ratio": plan.get("achieved_ratio", 0.0),
        },
        "recover": ctx.recover_info,
        "scores_s": {name: r.get("seconds") for name, r in ctx.scores.items()},
        "timing_s": timing,
        "peak_memory_mb": peak_memory_mb(),
        "seed": ctx.recipe.seed,
        "versions": versions(),
    }


class PeakRSS:
    """Samples this process's resident memory from a thread while a block runs: ``peak_mb`` after.

    ru_maxrss only knows the whole process's peak; this isolates one criterion's scoring.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        import psutil

        self._proc, self._interval, self._stop = psutil.Process(), interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_mb = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
