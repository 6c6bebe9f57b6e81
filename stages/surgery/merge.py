"""Layer merges: LaCo's RDSC merge (Yang, Cao & Zhao, 2024, arXiv 2402.11187, Eq. 2), "Reserving Differences
while Seeking Common". For layer l absorbing the next m:

    θ* = θ_l + Σ_{k=1}^{m} (θ_{l+k} − θ_l)

applied to every linear weight (and bias) of the block; the norms keep layer l's weights, as in the
authors' notebook. (That notebook accumulates the differences against the already-updated θ_l, which
leaves θ_{l+m}; we implement the paper's formula.) The LaCo criterion (``prunelab.stages.criteria.laco``) tries merges
with the merged tensors swapped into the model and back (``assigned``); ``prunelab.stages.surgery.apply`` replays the
kept ones from the plan.

Without the whole model (the sequential pipeline, ``load: streaming``): ``rdsc_state`` builds a merged block's tensors
from its resident sources without touching them, and ``MergedBlocks`` keeps each merged block as one safetensors file
on disk, so a later merge or forward that needs it reads it back like any other block — the same float32 tensors a
resident replay holds, hence the same arithmetic for a merge of a merged block.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


CHUNK = 1 << 20  # elements summed in float64 at a time: 8 MB temporaries instead of several copies of a matrix


def _rdsc(w: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """θ + Σ_k (θ_k − θ) in float64, cast back, over ``CHUNK`` elements at a time (element-wise: the same bits
    as one pass over the whole tensor)."""
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    flat, dst, srcs = w.reshape(-1), out.view(-1), [o.reshape(-1) for o in others]
    if w.device.type == "meta":
        return out
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK].double()
        delta = sum(o[start : start + CHUNK].double() - part for o in srcs)
        dst[start : start + CHUNK] = (part + delta).to(w.dtype)
    return out


def _merged_linears(base: torch.nn.Module, others: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, θ_base + Σ_k (θ_k − θ_base)) for every Linear weight and bias of the block, one at a time
    (float64 sums, cast back to the parameter's dtype)."""
    for name, lin in base.named_modules():
        if not isinstance(lin, torch.nn.Linear):
            continue
        for attr in ("weight", "bias"):
            p = getattr(lin, attr)
            if p is None:
                continue
            value = _rdsc(p.data, [getattr(o.get_submodule(name), attr).data for o in others])
            yield f"{name}.{attr}" if name else attr, value


def rdsc_merge(base: torch.nn.Module, others: list[torch.nn.Module]) -> None:
    """θ_base ← θ_base + Σ_k (θ_k − θ_base) for every Linear of the block, in place (float64 sums)."""
    params = dict(base.named_parameters())
    for key, value in _merged_linears(base, others):
        params[key].data.copy_(value)


def rdsc_state(base: torch.nn.Module, others: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The merged block's whole state dict, ``base`` and ``others`` left as they are: the RDSC sums of
    ``rdsc_merge`` (the same arithmetic) for the Linears, copies of ``base``'s other tensors (its norms). Holds one
    new block; the sources may be freed as soon as it returns."""
    merged = dict(_merged_linears(base, others))
    return {k: merged[k] if k in merged else t.detach().clone() for k, t in base.state_dict().items()}


@contextmanager
def assigned(layer: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside: ``layer`` holds the tensors of ``state`` (assigned, not copied); after: its own tensors again (the
    same objects, so a resident model is left exactly as it was and a meta skeleton's layer is back on meta)."""
    saved = dict(layer.state_dict(keep_vars=True))
    layer.load_state_dict(state, strict=True, assign=True)
    try:
        yield
    finally:
        layer.load_state_dict(saved, strict=True, assign=True)


class MergedBlocks:
    """Merged blocks by original index, each one safetensors file in a folder of its own (under ``parent`` when
    given): a block merged away from memory is read back only while a forward or a later merge needs it."""

    def __init__(self, device: torch.device | str = "cpu", parent: str | Path | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="prunelab-merged-", dir=parent))
        self.device = torch.device(device)
        self.files: dict[int, Path] = {}

    def __contains__(self, index: object) -> bool:
        return index in self.files

    def put(self, index: int, state: dict[str, torch.Tensor]) -> None:
        path = self.folder / f"block-{index}.safetensors"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path))
        self.files[index] = path

    def get(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in load_file(str(self.files[index])).items()}

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.files.clear()


@contextmanager
def block_resident(adapter: Any, weights: Any, merged: MergedBlocks, index: int) -> Iterator[None]:
    """Block ``index`` resident as the merges so far left it: its merged tensors read back from ``merged``, or its own
    through ``weights`` (a ``BlockWeights``: from the safetensors files, or a no-op for a resident model)."""
    if index in merged:
        with assigned(adapter.layers[index], merged.get(index)):
            yield
    else:
        with weights.block(adapter, index):
            yield


def replay_merges(adapter: Any, weights: Any, merges: list[dict[str, Any]], merged: MergedBlocks) -> None:
    """A plan's merges in plan order (``apply.merge_blocks``' order and arithmetic) with only the merge sources
    resident: each merged block goes to ``merged``, where a later merge that absorbs it reads it back."""
    layers = adapter.layers
    for mg in merges:
        into, sources = mg["into"], list(mg["from"])
        with torch.no_grad(), ExitStack() as resident:
            for j in [into, *sources]:
                resident.enter_context(block_resident(adapter, weights, merged, j))
            state = rdsc_state(layers[into], [layers[j] for j in sources])
        merged.put(into, state)
