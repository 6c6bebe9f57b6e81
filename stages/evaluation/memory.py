"""Memory readings: the process's peak, and a sampler that isolates one block of work."""

from __future__ import annotations

import resource
import threading


def peak_memory_mb() -> dict[str, float | None]:
    import torch  # lazy: torch-free

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"cpu_rss": round(rss_kb / 1024, 1), "gpu": round(gpu, 1) if gpu is not None else None}


class PeakRSS:
    """Samples this process's resident memory from a thread while a block runs: ``peak_mb`` after.

    ru_maxrss only knows the whole process's peak; this isolates one criterion's scoring.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import psutil  # lazy: startup

        self._proc, self._interval, self._stop = psutil.Process(), interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_mb = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 (typing.Self needs 3.11; we support 3.10)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
