"""LaCo — Layer Collapse (Yang, Cao & Zhao, 2024, arXiv 2402.11187): rear layers are merged into an earlier
one instead of being dropped, and a merge is kept only while the collapsed model still represents the
calibration text like the dense one.

RDSC layer merge ("Reserving Differences while Seeking Common", Eq. 2), for layer l absorbing the next m:

    θ* = θ_l + Σ_{k=1}^{m} (θ_{l+k} − θ_l)

applied to every linear weight (and bias) of the block (``prunelab.stages.surgery.merge.rdsc_state``: surgery
arithmetic, so it lives with the surgery that applies the plan; the trials swap the merged tensors in and back).

Trial-and-merge (Algorithm 1): start at l = H − C, try collapsing C layers (l and the C − 1 after it)
into l; if the similarity s = mean over calibration sequences of cos(h_dense, h_merged) — the
flattened last hidden states (after the final norm), as in the reference — exceeds T, keep it and
step l ← l − I, else l ← l − 1; stop below L or once the target number of removed layers is reached.
The result is a plan of merges (applied by ``prunelab.stages.surgery.apply``) and the removed layers.

Two ways to run the trials, the same plan and similarities (tests/test_laco_sequential.py):

- ``full``: the model resident; each trial's merged block assigned into the model in place of block l (kept merges
  stay there until the end, every original tensor is put back after), the collapsed model run from the embeddings.
- ``sequential`` (the recipe's calibrate pipeline, and always with ``model: {load: streaming}``): trials go from the
  top down, so every kept merge lies above the block tried and block l's input is the *dense* boundary state x_l.
  One dense pass, one block resident, keeps the checkpoints among the S positions a trial can start at — x_low,
  x_{low+k}, … (k = the pipeline's ``checkpoint_every``, default ⌈√S⌉; 1 keeps all S) — and the dense final states
  (in memory up to ``memory_budget_gb``, then memory-mapped files). A trial at l whose x_l was not kept recomputes its
  segment first: the dense blocks s … l−1 run again from the checkpoint x_s below, one resident at a time, and every
  state x_{s+1} … x_l is kept, because the next trials (l−1, l−2, …) start inside the same segment — each block of a
  segment is recomputed once per segment, not once per trial (the Taylor backward's scheme,
  ``prunelab.stages.calibration.backward``). States above the trial are freed as the trials descend. A trial then
  runs x_l → the merged block (its C sources resident while ``rdsc_state`` sums them, freed before the forward) →
  each block still alive above it, one at a time → the final norm. A kept merge is written to disk
  (``MergedBlocks``) and read back when a later trial runs it or merges it again — never recomputed, never held.
  Peak: the C merge sources + the merged block, plus the boundary states: at most ⌈S/k⌉ checkpoints + k − 1
  recomputed states + the dense final states + the trial's two boundaries (k = 1: S + 3). A trial at l costs the
  blocks above l, not the whole model; checkpoints add at most one forward of the blocks below the top start.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelab.stages.arch import adapter_for
from prunelab.stages.calibration.backward import checkpoint_interval
from prunelab.stages.calibration.blocks import batches, run_over_batches
from prunelab.stages.calibration.pipelines import SequentialPipeline
from prunelab.stages.calibration.sequential import BoundaryCache, MemoryPool, ResidentWeights
from prunelab.stages.calibration.streamed import weights_of
from prunelab.stages.criteria.base import CriterionInputs, CriterionResult
from prunelab.stages.criteria.settings import LacoSettings
from prunelab.stages.surgery.merge import MergedBlocks, assigned, block_resident, rdsc_state


def _final_states(model: torch.nn.Module, calibration: torch.Tensor, batch_size: int, skip: frozenset[int]) -> list[torch.Tensor]:
    adapter = adapter_for(model)
    out = []
    with torch.inference_mode():
        for ids in batches(calibration, batch_size):
            out.append(adapter.final_norm(adapter.boundary_states(ids, skip=skip)[-1]).float())
    return out


def _cosines(reference: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """cos(h_dense, h_merged) of every sequence of one batch, the states flattened per sequence."""
    return torch.nn.functional.cosine_similarity(reference.flatten(1), states.flatten(1), dim=1)


def similarity(reference: list[torch.Tensor], states: list[torch.Tensor]) -> float:
    """Mean over sequences of the cosine between flattened last hidden states (LaCo's s)."""
    return torch.cat([_cosines(a, b) for a, b in zip(reference, states)]).mean().item()


class _FullTrials:
    """Trials on the resident model: the merged block assigned in place of block l, the whole collapsed model run.
    Kept merges stay assigned until ``close``, which puts every original tensor back (the model is left untouched)."""

    def __init__(self, inp: CriterionInputs) -> None:
        self.inp, self.layers = inp, inp.adapter.layers
        self.reference = _final_states(inp.model, inp.calibration, inp.batch_size, frozenset())
        self.originals: dict[int, ExitStack] = {}  # kept merges: what puts each block's own tensors back
        self.pending: ExitStack | None = None

    def trial(self, base: int, absorbed: list[int], gone: frozenset[int], above: list[int]) -> float:
        with torch.no_grad():  # parameters, not inference tensors: they are assigned into the model
            state = rdsc_state(self.layers[base], [self.layers[j] for j in absorbed])
        self.pending = ExitStack()
        self.pending.enter_context(assigned(self.layers[base], state))
        inp = self.inp
        return similarity(self.reference, _final_states(inp.model, inp.calibration, inp.batch_size, gone))

    def keep(self, base: int) -> None:
        assert self.pending is not None
        self.originals[base] = self.pending  # restored in close()
        self.pending = None

    def drop(self, base: int) -> None:
        assert self.pending is not None
        self.pending.close()
        self.pending = None

    def close(self) -> None:
        if self.pending is not None:
            self.pending.close()
        for stack in reversed(self.originals.values()):
            stack.close()
        self.originals.clear()


class _SequentialTrials:
    """Trials from the dense boundary states, one block resident at a time (see the module docstring)."""

    def __init__(self, inp: CriterionInputs, starts: range) -> None:
        settings = inp.pipeline if isinstance(inp.pipeline, SequentialPipeline) else SequentialPipeline()
        self.ad = inp.adapter
        self.weights = weights_of(inp.model) or ResidentWeights()
        device = getattr(self.weights, "device", None) or self.ad.device
        parent = settings.offload_dir
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="prunelab-laco-", dir=parent))
        self.merged = MergedBlocks(device, self.folder)
        self.pool = MemoryPool(settings.memory_budget_gb * 2**30)  # every cache below shares the one budget
        self.ids = list(batches(inp.calibration, inp.batch_size))
        self.prepared: dict[tuple[int, ...], Any] = {}
        # checkpoints x_low, x_{low+k}, … and the segment recomputed below the current trial (never above it)
        self.dense: dict[int, BoundaryCache] = {}
        self.every = checkpoint_interval(settings.checkpoint_every, len(starts))
        self.most_stored = 0  # the most dense boundaries held at once (tests/test_laco_sequential.py counts them)
        self.pending: dict[str, torch.Tensor] | None = None
        try:
            self._dense_pass({l for l in starts if (l - starts.start) % self.every == 0})
        except BaseException:
            self.close()
            raise

    def _cache(self, tag: str) -> BoundaryCache:
        return BoundaryCache(self.pool.budget, self.folder, tag, self.pool)

    def _inputs(self, x: torch.Tensor) -> Any:
        return self.prepared[tuple(x.shape[:2])]

    def _stored(self) -> None:
        self.most_stored = max(self.most_stored, len(self.dense))

    def _dense_pass(self, checkpoints: set[int]) -> None:
        ad, weights = self.ad, self.weights
        current = self._cache("x0")
        with torch.no_grad():
            with weights.embedding(ad):
                for b, ids in enumerate(self.ids):
                    x = ad.embed(ids)
                    key = tuple(x.shape[:2])
                    if key not in self.prepared:
                        self.prepared[key] = ad.prepare(x)
                    current.put(b, x)
            for i in range(ad.num_blocks):
                if i in checkpoints:
                    self.dense[i] = current
                    self._stored()
                following = self._cache(f"x{i + 1}")
                with weights.block(ad, i):
                    run_over_batches(ad, i, current, following, len(self.ids), self._inputs)
                if i not in checkpoints:
                    current.clear()
                current = following
            with weights.head(ad):
                self.norm = copy.deepcopy(ad.final_norm)  # the final norm alone stays resident (one vector)
            self.reference = self._cache("reference")
            for b in range(len(self.ids)):
                self.reference.put(b, self.norm(current.get(b)).float())
            current.clear()

    def _dense_state(self, base: int) -> BoundaryCache:
        """The dense x_base, handed over to the trial (which frees it). States above ``base`` are freed first (trials
        only go down); when x_base was not kept, the segment from the checkpoint x_s below is recomputed — the
        dense blocks s … base−1 (below every kept merge, so as loaded), one resident at a time — and every state of
        it stays for the trials that follow (base−1, base−2, … down to s)."""
        for index in [j for j in self.dense if j > base]:
            self.dense.pop(index).clear()
        if base not in self.dense:
            start = max(j for j in self.dense if j < base)  # x_low is a checkpoint: some s < base is always kept
            with torch.no_grad():
                for j in range(start, base):
                    following = self._cache(f"r{j + 1}")
                    with self.weights.block(self.ad, j):
                        run_over_batches(self.ad, j, self.dense[j], following, len(self.ids), self._inputs)
                    self.dense[j + 1] = following
                    self._stored()
        return self.dense.pop(base)

    def _resident(self, index: int) -> Any:
        """Block ``index`` as the collapsed model has it: merged (read back from disk) or as loaded."""
        return block_resident(self.ad, self.weights, self.merged, index)

    def _run(self, index: int, states: BoundaryCache) -> BoundaryCache:
        """Block ``index`` (resident) on every batch's state; the input states are freed."""
        following = self._cache(f"t{index + 1}")
        run_over_batches(self.ad, index, states, following, len(self.ids), self._inputs)
        states.clear()
        return following

    def trial(self, base: int, absorbed: list[int], gone: frozenset[int], above: list[int]) -> float:
        layers = self.ad.layers
        dense = self._dense_state(base)  # x_base (its segment recomputed first, one block resident): later trials start lower
        with torch.no_grad():
            with ExitStack() as sources:  # the C merge sources resident while their sum is formed, then freed
                for j in [base, *absorbed]:
                    sources.enter_context(self._resident(j))
                state = rdsc_state(layers[base], [layers[j] for j in absorbed])
            with assigned(layers[base], state):
                states = self._run(base, dense)
            for j in above:
                with self._resident(j):
                    states = self._run(j, states)
            cosines = [_cosines(self.reference.get(b), self.norm(states.get(b)).float()) for b in range(len(self.ids))]
            states.clear()
        self.pending = state
        return torch.cat(cosines).mean().item()

    def keep(self, base: int) -> None:
        assert self.pending is not None
        self.merged.put(base, self.pending)
        self.pending = None

    def drop(self, base: int) -> None:
        self.pending = None

    def close(self) -> None:
        for cache in self.dense.values():
            cache.clear()
        self.dense.clear()
        if hasattr(self, "reference"):
            self.reference.clear()
        self.merged.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def laco(inp: CriterionInputs) -> CriterionResult:
    """Trial-and-merge layer collapse until ``num_remove`` layers are gone (see the module docstring)."""
    assert inp.num_remove is not None and inp.calibration is not None, "laco needs num_remove and calibration data"
    opts = inp.settings or LacoSettings()
    merge_size, interval, threshold = opts.merge_layers, opts.interval, opts.threshold
    n = inp.adapter.num_blocks
    low, high = opts.layers or (0, n - 1)
    alive = list(range(n))  # original indices of the layers still in the collapsed model
    merges: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []
    removed = 0
    pos = min(high, len(alive) - 1) - merge_size
    # Trials start at positions pos, pos − 1, …; every kept merge lies above them, so alive[pos] == pos.
    sequential = getattr(inp.pipeline, "type", "full") == "sequential" or weights_of(inp.model) is not None
    engine = _SequentialTrials(inp, range(max(low, 0), pos + 1)) if sequential else _FullTrials(inp)
    bar = tqdm(total=inp.num_remove, desc="LaCo merges", disable=not inp.progress)
    try:
        while pos >= low and removed < inp.num_remove:
            m = min(merge_size - 1, len(alive) - 1 - pos, inp.num_remove - removed)
            if m < 1:
                pos -= 1
                continue
            base, absorbed = alive[pos], alive[pos + 1 : pos + 1 + m]
            gone = frozenset(set(range(n)) - set(alive) | set(absorbed))
            s = engine.trial(base, absorbed, gone, alive[pos + 1 + m :])
            kept = s > threshold
            trials.append({"into": base, "from": absorbed, "similarity": s, "kept": kept})
            if kept:
                engine.keep(base)
                merges.append({"into": base, "from": absorbed, "similarity": s})
                alive = [i for i in alive if i not in set(absorbed)]
                removed += m
                bar.update(m)
                pos -= interval  # positions up to pos are untouched, so pos stays below len(alive)
            else:
                engine.drop(base)
                pos -= 1
    finally:
        bar.close()
        engine.close()
    if removed < inp.num_remove:
        raise ValueError(
            f"LaCo merged away only {removed} of {inp.num_remove} layers: no further merge keeps the similarity above "
            f"threshold={threshold} (last trials: {[round(t['similarity'], 3) for t in trials[-3:]]}); lower "
            f"score.settings.laco.threshold, widen score.settings.laco.layers or lower the target"
        )
    order = [j for mg in merges for j in mg["from"]]
    scores = [0.0 if i in set(order) else 1.0 for i in range(n)]
    return CriterionResult(scores=scores, order=order, extra={"merges": merges, "trials": trials,
                                                             "settings": {"merge_layers": merge_size, "interval": interval,
                                                                          "threshold": threshold, "layers": [low, high]}})
