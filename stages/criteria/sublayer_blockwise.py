"""The sublayer removal walk with one decoder layer resident: ``sublayer_ppl`` and ``sublayer_sleb`` under
``calibration: {pipeline: sequential}`` (and always with ``model: {load: streaming}``), issue 28.

``SublayerWalk`` (``prunelab.stages.criteria.sublayer_nll``) holds the whole model and, per batch, the state entering
every kept sublayer. Here the same states live in ``BoundaryCache``s — ``states[q]`` holds every batch's state entering
``kept[q]``, ``states[K]`` the final one — in memory up to ``memory_budget_gb`` (one ``MemoryPool`` shared by every
cache of the walk), past it memory-mapped files in ``offload_dir``. A *pass* walks the kept sublayers from the lowest
position it needs to the last, layer by layer, each layer resident once (``BlockWeights``: a no-op for a resident
model, read from the safetensors shards and freed for a streamed skeleton), and carries every candidate of the pass
through it — RemovalNLLObserver's wavefront at sublayer granularity: candidate q (``kept[q]`` removed) starts from
``states[q]`` once ``kept[q]`` has been passed and goes through every later kept sublayer (that sublayer's layer run
with its other sublayer swapped for a no-op, ``alone``), one candidate and one batch at a time (``run_over_batches``),
so every unit runs on the shapes ``full`` runs it on and the values are ``full``'s. The final norm and the head are
resident at the end of a pass, for the NLL of every candidate (and of the current model when the pass refreshed it).

Refreshing is part of a pass: states invalid from position s on (none yet, or a removal whose states were not kept)
are recomputed on every batch while the pass goes through s … K−1, before any candidate needs them.

Cost in layer loads (L layers, ``layer(q)`` = the layer of ``kept[q]``; + 1 head load per pass; the embedding once):

- ``sublayer_ppl``: ONE pass — the dense states and every candidate together: L layer loads, L + 1 with the head.
  The unit evaluations are full's (Σ over candidates of the sublayers after them, ~K²/2 per batch).
- ``sublayer_sleb``, per round: the first round's first pass also computes the dense states (L loads; with screening
  it screens every candidate on the first ⌈screen·N⌉ windows in it). Then every re-scoring call of the greedy is one
  pass: the ``min_fresh`` best-estimated candidates together (L − layer(lowest of them)), each further lazy
  challenger alone (L − layer(q)), ``lazy: false`` all candidates together (L − layer(lowest)). The winner's states
  after its position are the states its pass left when that pass carried at most ``KEEP_TAILS`` candidates (they
  are kept, to disk past the budget); otherwise one more pass from its position (L − layer(q*)). A typical lazy round:
  one pass of ``min_fresh`` candidates, the winner's tails kept: ≤ L layer loads. The decisions are full's: the same
  values in the same order (``sublayer_sleb`` asks both walks the same questions).

Memory: one layer (the head at the end of a pass) + per batch the K + 1 walk states and, during a pass, one state
per running candidate (≤ K; ``KEEP_TAILS`` × K more while tails are kept) — all in the boundary caches, so past
``memory_budget_gb`` on disk (K = 2L sublayers).
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import nullcontext
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelab.stages.calibration.blocks import batches, run_over_batches
from prunelab.stages.calibration.pipelines import SequentialPipeline
from prunelab.stages.calibration.sequential import BoundaryCache, MemoryPool, ResidentWeights
from prunelab.stages.calibration.streamed import weights_of
from prunelab.stages.criteria.base import CriterionInputs
from prunelab.stages.criteria.sublayer_nll import KEEP_TAILS, Unit, alone


class Tails:
    """One candidate's states after its removed position (a cache per later position, the last one final) and its NLL
    per batch: what ``remove`` installs instead of recomputing them."""

    def __init__(self, caches: list[BoundaryCache], nll: list[float]) -> None:
        self.caches, self.nll = caches, nll

    def clear(self) -> None:
        for cache in self.caches:
            cache.clear()
        self.caches = []


class BlockwiseSublayerWalk:
    """``SublayerWalk``'s questions (``deltas``, ``remove``, ``nll``) answered with one layer resident (module
    docstring). ``close`` removes every cached state."""

    def __init__(self, inp: CriterionInputs, kept: list[Unit]) -> None:
        settings = inp.pipeline if isinstance(inp.pipeline, SequentialPipeline) else SequentialPipeline()
        self.ad, self.kept, self.progress = inp.adapter, list(kept), inp.progress
        self.weights = weights_of(inp.model) or ResidentWeights()
        parent = settings.offload_dir
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="prunelab-sublayers-", dir=parent))
        self.pool = MemoryPool(settings.memory_budget_gb * 2**30)  # every cache of the walk shares the one budget
        self.ids = list(batches(inp.calibration, inp.batch_size))
        self.prepared: dict[tuple[int, ...], Any] = {}
        self.made = 0  # caches created (unique file tags)
        self.base: list[float] = [0.0] * len(self.ids)  # NLL sum of each batch on the current model
        self.states: list[BoundaryCache] = [self._cache()]
        self.stale: int | None = 0  # states after this position are to be recomputed (None: all valid)
        try:
            with torch.inference_mode(), self.weights.embedding(self.ad):
                for b, ids in enumerate(self.ids):
                    x = self.ad.embed(ids)
                    key = tuple(x.shape[:2])
                    if key not in self.prepared:
                        self.prepared[key] = self.ad.prepare(x)
                    self.states[0].put(b, x)
        except BaseException:
            self.close()
            raise

    def _cache(self) -> BoundaryCache:
        self.made += 1
        return BoundaryCache(self.pool.budget, self.folder, f"s{self.made}", self.pool)

    def _inputs(self, x: torch.Tensor) -> Any:
        return self.prepared[tuple(x.shape[:2])]

    def _nll(self, cache: BoundaryCache, b: int) -> float:
        h = cache.get(b)
        return self.ad.nll_per_sequence(h, self.ids[b].to(h.device)).sum().item()

    def tokens(self, count: int) -> int:
        return sum(self.ids[b][:, 1:].numel() for b in range(count))

    @torch.inference_mode()
    def _pass(self, starts: list[int], count: int, keep: bool, desc: str | None = None
              ) -> tuple[list[float], dict[int, Tails]]:
        """Every candidate in ``starts`` (positions in ``kept``) removed alone, on the first ``count`` batches, the
        invalid states refreshed on the way (all batches); returns the mean per-token ΔNLL of each and, with
        ``keep``, their tails."""
        K, stale = len(self.kept), self.stale
        low = min([*starts, *([stale] if stale is not None else [])], default=K)
        if stale is not None:
            for cache in self.states[stale + 1 :]:
                cache.clear()
            del self.states[stale + 1 :]
        begin = set(starts)
        running: dict[int, BoundaryCache] = {}
        made: dict[int, list[BoundaryCache]] = {q: [] for q in starts}
        layers = groupby(range(low, K), key=lambda p: self.kept[p][1])
        for layer, group in tqdm(layers, desc=desc, disable=desc is None or not self.progress):
            group = list(group)
            work = running or (stale is not None and group[-1] >= stale) or begin & set(group[:-1])
            with self.weights.block(self.ad, layer) if work else nullcontext():
                for p in group:
                    which = self.kept[p][0]
                    with alone(self.ad, layer, which):
                        if stale is not None and p >= stale:
                            following = self._cache()
                            run_over_batches(self.ad, layer, self.states[p], following, len(self.ids), self._inputs)
                            self.states.append(following)
                        for q, source in running.items():
                            target = self._cache()
                            run_over_batches(self.ad, layer, source, target, count, self._inputs)
                            made[q].append(target)
                            if not keep and source is not self.states[q]:
                                source.clear()  # a walk state is the walk's; a tail is kept only with ``keep``
                            running[q] = target
                    if p in begin:
                        running[p] = self.states[p]  # kept[p] skipped: its input goes on to the next sublayer
        with self.weights.head(self.ad):
            if stale is not None:
                self.base = [self._nll(self.states[K], b) for b in range(len(self.ids))]
                self.stale = None
            deltas, tails = [], {}
            for q in starts:
                nll = [self._nll(running[q], b) for b in range(count)]
                deltas.append(sum(n - self.base[b] for b, n in enumerate(nll)) / self.tokens(count))
                if keep:
                    tails[q] = Tails(made[q], nll)
                elif running[q] is not self.states[q]:
                    running[q].clear()
        return deltas, tails

    def deltas(self, qs: list[int], count: int, keep: bool = False, desc: str | None = None
               ) -> tuple[list[float], dict[int, Tails]]:
        """Mean per-token ΔNLL over the first ``count`` batches of removing each ``kept[q]`` alone from the current
        model, in one pass; with ``keep`` (and at most ``KEEP_TAILS`` candidates) also the states each leaves."""
        return self._pass(list(qs), count, keep and len(qs) <= KEEP_TAILS, desc)

    def remove(self, q: int, tails: Tails | None = None) -> Unit:
        """Remove ``kept[q]``; the states after it are ``tails`` (from ``deltas`` on all batches) or recomputed by
        the next pass (``nll`` runs one when none comes first)."""
        unit = self.kept.pop(q)
        if tails is not None and len(tails.nll) == len(self.ids):
            for cache in self.states[q + 1 :]:
                cache.clear()
            self.states = self.states[: q + 1] + tails.caches
            self.base = list(tails.nll)
        else:
            self.drop(tails)
            self.stale = q if self.stale is None else min(self.stale, q)
        return unit

    def drop(self, tails: Tails | None) -> None:
        if tails is not None:
            tails.clear()

    def nll(self) -> float:
        """Mean per-token NLL of the current model on all windows."""
        if self.stale is not None:
            self._pass([], len(self.ids), False)
        return sum(self.base) / self.tokens(len(self.ids))

    def close(self) -> None:
        for cache in self.states:
            cache.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
