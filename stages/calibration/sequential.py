"""The ``sequential`` pipeline: one block resident at a time, the boundary states carried from block to block.

The loop (llm-compressor's sequential pipeline and SparseGPT's ``llama_sequential`` order, with our observers):
the embeddings of every batch → boundary cache x_0; then for each block i: its weights materialized, the
observers' hooks attached, every batch's x_i run through it (x_{i+1} into the next cache, each observer told),
hooks off, the block freed. ``propagate: dense`` feeds block i+1 the dense block i's outputs, so the statistics
are the ones ``full`` collects (same sums, in the same batch order).

Where the weights come from (``BlockWeights``):
- ``ResidentWeights``: the model is already in memory (the runner's load stage; a GGUF source such as SmolLM2 is
  dequantised to a torch model once anyway), so "materialize" is a no-op. Peak memory is the model plus the
  boundary states: the same order of magnitude as ``full``; what it buys is the engine, not the memory.
- ``SafetensorsWeights``: a meta-device skeleton built from the config (``skeleton``); block i's tensors read with
  ``safe_open`` under the names of the block's ``state_dict`` (``adapter.block_prefix(i)``), and sent back to
  ``meta`` after. Peak memory: one block + the embedding (first step only) + the boundary states (up to
  ``memory_budget_gb``, then memory-mapped files) + the observers' sums. docs/calibration.md has the formula.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from prunelab.stages.arch import adapter_for
from prunelab.stages.arch.base import ArchAdapter, BlockInputs
from prunelab.stages.calibration.backward import blockwise_backward, checkpoint_interval, is_checkpoint
from prunelab.stages.calibration.blocks import batches
from prunelab.stages.calibration.observers import start_observers
from prunelab.stages.calibration.pipelines import SequentialPipeline, refusals
from prunelab.stages.calibration.stats import CalibrationStats
from prunelab.stages.calibration.streamed import spill_gradients


class BlockWeights(Protocol):
    """Where one block's (and the embedding's) weights come from while the sequential pipeline holds it."""

    def embedding(self, adapter: ArchAdapter) -> Any: ...  # a context manager: the embedding resident inside it

    def block(self, adapter: ArchAdapter, index: int) -> Any: ...  # a context manager: block ``index`` resident

    def head(self, adapter: ArchAdapter) -> Any: ...  # a context manager: the final norm and the head resident


class ResidentWeights:
    """The model is resident already: nothing to load or free."""

    @contextmanager
    def embedding(self, adapter: ArchAdapter) -> Iterator[None]:
        yield

    @contextmanager
    def block(self, adapter: ArchAdapter, index: int) -> Iterator[None]:
        yield

    @contextmanager
    def head(self, adapter: ArchAdapter) -> Iterator[None]:
        yield


class SafetensorsWeights:
    """Tensors read from a ``save_pretrained`` folder's safetensors files (sharded or not) into a meta skeleton."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        self.folder, self.device, self.open = Path(folder), torch.device(device), safe_open
        index = self.folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            [p.name for p in sorted(self.folder.glob("*.safetensors"))]
        if not files:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors files; save the model with save_pretrained "
                                    "(safe_serialization) or use pipeline: full")
        self.where: dict[str, str] = {}
        for f in files:
            with safe_open(str(self.folder / f), framework="pt", device="cpu") as h:
                self.where.update(dict.fromkeys(h.keys(), f))

    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        """The module's tensors assigned from the files (cast to the skeleton's dtype). Each file is opened for the
        read and closed after, so its mapped pages leave the process with it."""
        names = list(module.state_dict())
        loose = [n for n, _ in module.named_buffers() if n not in names]
        if loose:  # not in any file: they would stay on meta
            raise ValueError(f"{prefix}: buffers {loose} are not saved with the weights; this family cannot be "
                             "streamed from safetensors yet — use pipeline: full")
        missing = [f"{prefix}.{n}" for n in names if f"{prefix}.{n}" not in self.where]
        if missing:
            raise KeyError(f"{self.folder}: tensors {missing[:3]} not found in the safetensors files: transformers "
                           "converts this checkpoint's layout when it loads it (e.g. fused mixture-of-experts "
                           "weights); run the sequential pipeline on the loaded model, or pipeline: full")
        dtypes = {n: t.dtype for n, t in module.state_dict(keep_vars=True).items()}
        state: dict[str, torch.Tensor] = {}
        for file in sorted({self.where[f"{prefix}.{n}"] for n in names}):
            with self.open(str(self.folder / file), framework="pt", device="cpu") as h:
                for n in names:
                    if self.where[f"{prefix}.{n}"] == file:
                        state[n] = h.get_tensor(f"{prefix}.{n}").to(self.device, dtypes[n])
        module.load_state_dict(state, strict=True, assign=True)

    @staticmethod
    def _free(module: torch.nn.Module) -> None:
        """Back to meta; glibc keeps freed blocks of a few MB in its heap, so hand them back to the system."""
        module.to("meta")
        _trim()

    @contextmanager
    def embedding(self, adapter: ArchAdapter) -> Iterator[None]:
        module = adapter.model.get_submodule(adapter.EMBED)
        self._load(module, adapter.EMBED)
        adapter.reset_rotary(adapter.model.config, self.device)  # computed buffers, never saved
        try:
            yield
        finally:
            self._free(module)

    @contextmanager
    def head(self, adapter: ArchAdapter) -> Iterator[None]:
        norm, head = adapter.model.get_submodule(adapter.NORM), adapter.model.get_submodule(adapter.HEAD)
        self._load(norm, adapter.NORM)
        tied = f"{adapter.HEAD}.weight" not in self.where and bool(getattr(adapter.model.config, "tie_word_embeddings", False))
        self._load(head, adapter.EMBED if tied else adapter.HEAD)  # tied: the head is the embedding matrix
        try:
            yield
        finally:
            self._free(norm)
            self._free(head)

    @contextmanager
    def block(self, adapter: ArchAdapter, index: int) -> Iterator[None]:
        layer = adapter.layers[index]
        self._load(layer, adapter.block_prefix(index))
        try:
            yield
        finally:
            self._free(layer)


def _trim() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); elsewhere nothing."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def skeleton(folder: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of a ``save_pretrained`` folder with every tensor on the meta device (no memory, no init)."""
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    adapter_for(model)  # a family without an adapter is refused here, before any weight is read
    return model.eval()


class MemoryPool:
    """Bytes of boundary states held in memory by the caches sharing it (the block-wise backward keeps every boundary
    alive at once, so they share one budget), and the peak of what went to disk."""

    def __init__(self, budget: float) -> None:
        self.budget, self.held, self.offloaded, self.peak_offloaded = budget, 0, 0, 0


class BoundaryCache:
    """The hidden states at one block boundary, one tensor per batch: in memory up to ``budget`` bytes (or up to the
    shared ``pool``'s), past it memory-mapped files in ``folder`` (written once, read once per block)."""

    def __init__(self, budget: float, folder: Path, tag: str, pool: MemoryPool | None = None) -> None:
        self.budget, self.folder, self.tag = budget, folder, tag
        self.pool = pool or MemoryPool(budget)
        self.items: dict[int, torch.Tensor] = {}
        self.devices: dict[int, torch.device] = {}
        self.held, self.offloaded = 0, 0
        self.files: list[Path] = []

    def put(self, batch: int, x: torch.Tensor) -> None:
        size = x.numel() * x.element_size()
        self.devices[batch] = x.device
        if self.pool.held + size <= self.pool.budget:
            self.items[batch] = x
            self.held += size
            self.pool.held += size
            return
        path = self.folder / f"{self.tag}-{batch}.bin"
        mapped = torch.from_file(str(path), shared=True, size=x.numel(), dtype=x.dtype).view(x.shape)
        mapped.copy_(x)
        self.items[batch], self.offloaded = mapped, self.offloaded + size
        self.pool.offloaded += size
        self.pool.peak_offloaded = max(self.pool.peak_offloaded, self.pool.offloaded)
        self.files.append(path)

    def get(self, batch: int) -> torch.Tensor:
        """The state, back on the device it came from (a no-op for states held there)."""
        return self.items[batch].to(self.devices[batch])

    def clear(self) -> None:
        self.items.clear()
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files.clear()
        self.pool.held -= self.held
        self.pool.offloaded -= self.offloaded
        self.held, self.offloaded = 0, 0


def collect_sequential(model: torch.nn.Module, calibration: torch.Tensor, needs: set[str], batch_size: int = 1,
                       progress: bool = True, settings: SequentialPipeline | None = None,
                       weights: BlockWeights | None = None, skip: frozenset[int] = frozenset()) -> CalibrationStats:
    """Every statistic in ``needs`` with one block resident at a time (``weights``: where the blocks come from;
    default: the model is resident). The needs must be ones the sequential pipeline collects
    (``prunelab.stages.calibration.pipelines.collect`` refuses the others with the reason). Gradients (``grad``,
    ``fisher``, ``hidden``) keep every k-th boundary state (``settings.checkpoint_every``), then run the block-wise
    backward (``prunelab.stages.calibration.backward``), which recomputes the states between. ``skip``: blocks left out of the model (SLEB's removed blocks; only
    ``removal_nll`` is defined on such a model)."""
    settings = settings or SequentialPipeline()
    weights = weights or getattr(model, "prunelab_weights", None) or ResidentWeights()  # a streamed skeleton's source
    if skip and set(needs) - {"removal_nll"}:
        raise ValueError(f"skip={sorted(skip)}: only removal_nll is collected on a model with blocks left out; "
                         f"got {sorted(needs)}")
    adapter = adapter_for(model)
    stats = CalibrationStats(num_blocks=adapter.num_blocks)
    spill_gradients(model, stats)  # a streamed skeleton: gradient sums on disk, block by block
    observers = start_observers(needs, stats, adapter)
    if not any(o.STATES or o.FORWARD or o.BACKWARD for o in observers):  # markers only (the criteria's own passes:
        for o in observers:  # LaCo, the sublayer removals): as in full, no pass — it would read every block for nothing
            o.finish()
        return stats
    backward = [o for o in observers if o.BACKWARD]
    folder = Path(settings.offload_dir) if settings.offload_dir else Path(tempfile.mkdtemp(prefix="prunelab-boundary-"))
    folder.mkdir(parents=True, exist_ok=True)
    # two boundaries alive at once (block i's inputs and outputs), or every one of them for the backward
    budget = settings.memory_budget_gb * 2**30 / (1 if backward else 2)
    pool = MemoryPool(budget) if backward else None
    t0 = time.perf_counter()
    ids_batches = list(batches(calibration, batch_size))
    current, peak_offloaded = BoundaryCache(budget, folder, "b0", pool), 0
    kept: list[BoundaryCache | None] = []  # the backward's boundary states x_0 … x_L (None: recomputed from a checkpoint)
    every = checkpoint_interval(settings.checkpoint_every, adapter.num_blocks)
    prepared: dict[tuple[int, ...], BlockInputs] = {}
    # inference tensors cannot be saved for a backward: gradients want the forward's states as ordinary tensors
    mode = torch.no_grad if backward else torch.inference_mode
    try:
        with mode():
            with weights.embedding(adapter):
                for b, ids in enumerate(ids_batches):
                    x = adapter.embed(ids)
                    key = tuple(x.shape[:2])
                    if key not in prepared:
                        prepared[key] = adapter.prepare(x)
                    current.put(b, x)
            for i in tqdm(range(adapter.num_blocks), desc="sequential calibration", disable=not progress):
                if i in skip:
                    continue
                following = BoundaryCache(budget, folder, f"b{i + 1}", pool)
                with weights.block(adapter, i):
                    layer = adapter.layers[i]
                    handles = [h for o in observers for h in o.hooks(i, layer)]
                    try:
                        for b in range(len(ids_batches)):
                            x_in = current.get(b)
                            x_out = adapter.run_block(i, x_in, prepared[tuple(x_in.shape[:2])])
                            for o in observers:
                                o.after_block(i, x_in, x_out, b)
                            following.put(b, x_out)
                    finally:
                        for h in handles:
                            h.remove()
                    for o in observers:  # hooks off: these re-run the block on their own states
                        o.block_done(i, current.get, lambda x: prepared[tuple(x.shape[:2])])
                peak_offloaded = max(peak_offloaded, current.offloaded + following.offloaded)
                if backward and is_checkpoint(i, every):
                    kept.append(current)
                else:
                    current.clear()
                    if backward:
                        kept.append(None)
                current = following
            with weights.head(adapter):
                for o in observers:
                    o.after_pass(current.get, ids_batches)
            if backward:
                kept.append(current)
                (gradients,) = backward  # one observer runs the backward (the gradient need)
                blockwise_backward(adapter, kept, ids_batches, lambda x: prepared[tuple(x.shape[:2])], weights,
                                   gradients, lambda tag: BoundaryCache(budget, folder, tag, pool), progress)
                peak_offloaded = pool.peak_offloaded if pool is not None else peak_offloaded
            for o in observers:
                o.finish()
    finally:
        current.clear()
        for cache in kept:
            if cache is not None:
                cache.clear()
        if not settings.offload_dir:
            shutil.rmtree(folder, ignore_errors=True)
    stats.seconds = time.perf_counter() - t0
    stats.offloaded_bytes = peak_offloaded
    return stats


def collect_from_pretrained(folder: str | Path, calibration: torch.Tensor, needs: set[str], batch_size: int = 1,
                            progress: bool = True, settings: SequentialPipeline | None = None,
                            dtype: torch.dtype | None = None) -> CalibrationStats:
    """The sequential pass over a ``save_pretrained`` folder without ever holding the model: a meta skeleton, one
    block's tensors read from the safetensors files at a time."""
    settings = settings or SequentialPipeline()
    refused = refusals(settings, needs)
    if refused:
        raise ValueError("the sequential calibration pipeline cannot collect "
                         + "; ".join(f"{n!r}: {why}" for n, why in refused.items()))
    model = skeleton(folder, dtype)
    return collect_sequential(model, calibration, needs, batch_size, progress, settings, SafetensorsWeights(folder))
