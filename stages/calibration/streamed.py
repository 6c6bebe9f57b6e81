"""The streamed skeleton (``model: {load: streaming}``, ``prunelab.stages.io.streaming`` has the whole picture):
built from a ``save_pretrained`` folder with its ``SafetensorsWeights`` attached, its layers made resident one at a
time for criteria that read weights, and gradient sums spilled to disk block by block — calibration-side, because
the sequential pipeline and the criteria call them.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from prunelab.stages.arch import adapter_for
from prunelab.stages.io.streaming import ATTR, ShardWriter, source_problems, stream_folder

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunelab.stages.io.config import ModelConfig


# ----------------------------------------------------------------------------- load
def load_streaming(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """The meta skeleton of the folder (weights never read here) with its ``SafetensorsWeights`` attached, and the
    tokenizer."""
    from prunelab.stages.calibration.sequential import SafetensorsWeights, skeleton  # lazy: torch-free
    from prunelab.stages.io.models import resolve_device, resolve_dtype  # lazy: torch-free
    from transformers import AutoTokenizer  # lazy: torch-free

    problems = source_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    folder = stream_folder(cfg)
    device = resolve_device(cfg.device)
    model = skeleton(folder, resolve_dtype(cfg.dtype, device))
    setattr(model, ATTR, SafetensorsWeights(folder, device))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def weights_of(model: Any) -> Any:
    """The ``SafetensorsWeights`` of a streamed skeleton, or None for a resident model."""
    return getattr(model, ATTR, None)


def is_streamed(model: Any) -> bool:
    return weights_of(model) is not None


@contextmanager
def layers_resident(model: Any) -> Iterator[None]:
    """Inside: iterating over the decoder layers of a streamed skeleton materializes each layer for the loop body and
    frees it when the loop moves on — criteria that read weights layer by layer (FLAP, Wanda-sp, magnitude, Taylor)
    run unchanged with one layer resident. Indexing (``layers[i]``) stays on meta. A resident model: nothing changes."""
    weights = weights_of(model)
    if weights is None:
        yield
        return
    ad = adapter_for(model)
    layers = ad.layers
    plain = type(layers)

    def stream(self: Any) -> Iterator[nn.Module]:
        for i, layer in enumerate(plain.__iter__(self)):
            with weights.block(ad, i):
                yield layer

    layers.__class__ = type("StreamedLayers", (plain,), {"__iter__": stream})
    try:
        yield
    finally:
        layers.__class__ = plain


# ----------------------------------------------------------------------------- score: gradient sums on disk
class SpilledTensors(MutableMapping):
    """name → float32 tensor, held in memory for one block at a time: when a name of another block is set (the
    block-wise backward folds block L−1, then L−2, …), the previous block's tensors go to one safetensors file and
    leave memory; reading a spilled name loads that tensor alone, for as long as the caller holds it. The gradient sums
    of a 1.2B model are 4.8 GB in float32: resident, they alone would be the whole model."""

    def __init__(self, folder: Path, group: Any) -> None:

        self.folder, self.group = folder, group
        self.hot: dict[str, torch.Tensor] = {}
        self.hot_group: str | None = None
        self.where: dict[str, Path] = {}
        self.flushes = 0
        weakref.finalize(self, _remove, str(folder))

    def flush(self) -> None:
        """The block in memory to its file."""
        if self.hot:  # ShardWriter, not save_file: save_file would first copy the block's sums into one bytes object
            folder = self.folder / f"spill-{self.flushes}"
            folder.mkdir()
            writer = ShardWriter(folder, {k: (tuple(v.shape), v.dtype) for k, v in self.hot.items()}, 1 << 62)
            for k, v in self.hot.items():
                writer.write(k, v)
            writer.close()
            self.where.update(dict.fromkeys(self.hot, folder / "model.safetensors"))
            self.flushes += 1
            self.hot.clear()

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        group = self.group(name)
        if group != self.hot_group:
            self.flush()
            self.hot_group = group
        if name in self.where:
            raise KeyError(f"{name}: its block was already spilled to disk; a block's sums are folded together")
        self.hot[name] = value

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.hot:
            return self.hot[name]
        with safe_open(str(self.where[name]), framework="pt", device="cpu") as h:
            return h.get_tensor(name)

    def __delitem__(self, name: str) -> None:
        if name in self.hot:
            del self.hot[name]
        else:
            del self.where[name]

    def __contains__(self, name: object) -> bool:
        return name in self.hot or name in self.where

    def __iter__(self) -> Iterator[str]:
        yield from self.where
        yield from (n for n in list(self.hot) if n not in self.where)

    def __len__(self) -> int:
        return len(self.where) + len(self.hot)


def _remove(folder: str) -> None:

    shutil.rmtree(folder, ignore_errors=True)


def spill_gradients(model: Any, stats: Any) -> None:
    """A streamed skeleton's gradient sums (``grad_sum``, ``grad_sq_sum``) kept on disk block by block
    (``SpilledTensors``); a resident model's stay in memory. Called by the sequential pipeline when its stats start."""
    if not is_streamed(model):
        return

    blocks = f"{adapter_for(model).BLOCKS}."

    def group(name: str) -> str:
        return ".".join(name.split(".")[: blocks.count(".") + 1]) if name.startswith(blocks) else "outside"

    stats.grad_sum = SpilledTensors(Path(tempfile.mkdtemp(prefix="prunelab-grad-")), group)
    stats.grad_sq_sum = SpilledTensors(Path(tempfile.mkdtemp(prefix="prunelab-grad2-")), group)
