"""Models larger than memory: a run on a meta-device skeleton whose blocks are read from the safetensors shards only
while a stage needs them, and an export that writes the pruned model block by block (issue 28 item 5).

``model: {source: <save_pretrained folder>, load: streaming}`` changes four places of a run, nothing else:

- load: ``skeleton`` (every tensor on ``meta``) with a ``SafetensorsWeights`` source attached to it;
- score: the sequential pipeline materializes block i for its pass; criteria that read weights (FLAP, Wanda-sp,
  magnitude, Taylor) see each layer resident while they iterate over the layers (``layers_resident``), one at a time;
  the Gram matrices of optimal compensation are NOT collected here (all layers' would be 6.9 GB for a 1.1B model in
  float64): the export collects them block by block;
- prune: plans are indices, made from scores alone (AlphaPruning's weight spectra refused), applied to the skeleton
  (shapes and config only); compensation is deferred (``after_plan`` adds its meta biases and flags);
- export: block i materialized, the dense block run on the calibration states (boundary cache) so its
  o_proj/down_proj Grams are collected, the plan's surgery and compensation for block i applied (the same
  ``prune_layer_width`` / ``bias_compensation`` code as a resident run, and ``optimal_compensation``'s arithmetic
  with fewer temporaries: ``lean_optimal``), its tensors
  written into pre-allocated safetensors shards (``ShardWriter``: headers computed from the pruned skeleton's
  shapes), freed. Embedding, final norm and head are copied tensor by tensor.

Refused at ``--dry-run`` (``streaming_problems``): GGUF sources, tiny built-in models, hub ids not in the local cache,
mixture-of-experts families (transformers converts their fused expert tensors on load), ``pipeline: full``,
self-generated calibration, hidden-channel and sublayer pruning, AlphaPruning allocation, evaluate/recover/iterate
stages (they need the whole model: evaluate the exported ``model/`` in a second, resident run), formats other than hf.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from prunelab.stages.arch import adapter_for, compensation_refusal, family_facts, unsupported_message
from prunelab.stages.arch.base import STAT_KEYS
from prunelab.stages.core.files import atomic_dir
from prunelab.stages.io.card import model_card
from prunelab.stages.io.sources import alias_dirs, classify
from prunelab.stages.surgery.plan import DepthPlan, WidthPlan

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunelab.stages.io.config import ModelConfig

ATTR = "prunelab_weights"  # the attribute of a streamed skeleton that holds its SafetensorsWeights
ALLOWED_STAGES = ("calibrate", "score", "prune", "export")
DEFAULT_SHARD_MB = 2048.0


# ----------------------------------------------------------------------------- validation (torch-free)
def stream_folder(cfg: ModelConfig) -> Path:
    """The local ``save_pretrained`` folder a streaming run reads, or a ValueError naming the fix."""
    src = classify(cfg.source, cfg.gguf_file)
    if src.kind == "gguf":
        raise ValueError("model.load: streaming reads safetensors shards; a GGUF source is dequantised whole on load — "
                         "convert it once (a resident run's export, or save_pretrained) and stream that folder")
    if src.kind == "tiny":
        raise ValueError(f"model.load: streaming needs a folder on disk; {cfg.source!r} is built from code — save it "
                         "with save_pretrained and give that folder, or use load: resident")
    if src.kind == "alias":
        folder = alias_dirs(src.path)[1]
        if not (folder / "config.json").is_file():
            raise ValueError(f"model.load: streaming: alias {cfg.source!r} has no converted safetensors copy yet; run "
                             "it once with load: resident (it converts the GGUF), then stream")
        return folder
    if src.kind == "hub":
        from huggingface_hub import try_to_load_from_cache  # lazy: startup

        found = try_to_load_from_cache(src.path, "config.json", revision=cfg.revision)
        if not isinstance(found, str):
            raise ValueError(f"model.load: streaming: hub model {cfg.source!r} is not in the local Hugging Face cache; "
                             f"download it first (hf download {cfg.source}) or give a local save_pretrained folder")
        return Path(found).parent
    return Path(src.path)


def source_problems(cfg: ModelConfig) -> list[str]:
    """Why this model cannot be streamed (empty: it can): where it is, its files, its family."""
    try:
        folder = stream_folder(cfg)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        return [str(exc)]
    if not any(folder.glob("*.safetensors")):
        return [f"model.load: streaming: {folder} holds no *.safetensors files; save the model with save_pretrained "
                "(safetensors) first, or use load: resident"]
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    facts = family_facts(model_type)
    if facts is None:
        return [f"model.load: streaming: {unsupported_message(model_type)}"]
    if facts.moe:
        return [f"model.load: streaming: {model_type} is a mixture of experts, whose checkpoint tensors transformers "
                "converts on load (fused experts): blocks cannot be read as saved; use load: resident"]
    return []


def streaming_problems(cfg: ModelConfig, stages: dict[str, Any]) -> list[str]:
    """Every reason a recipe cannot run with ``model.load: streaming``, each naming the fix (``--dry-run``)."""
    problems = source_problems(cfg)
    if not any(getattr(s, "type", None) == "export" for s in stages.values()):
        problems.append("model.load: streaming writes the pruned model only in an export stage; add one "
                        "({type: export}) at the end")
    for key, s in stages.items():
        kind = getattr(s, "type", None)
        where = f"stages.{key}"
        if kind not in ALLOWED_STAGES:
            problems.append(f"{where}: a {kind} stage needs the whole model resident, which model.load: streaming never "
                            "holds; remove it and evaluate the exported model/ in a second run with load: resident")
            continue
        if kind == "calibrate":
            pipeline = getattr(s.pipeline, "type", "full")
            if pipeline != "sequential":
                problems.append(f"{where}.pipeline: {pipeline} holds the whole model; model.load: streaming needs "
                                "pipeline: {type: sequential}")
            elif getattr(s.pipeline, "propagate", "dense") != "dense":
                problems.append(f"{where}.pipeline.propagate: model.load: streaming applies the plan at export; use "
                                "propagate: dense")
            if "self_generated" in json.dumps(s.source.model_dump(mode="json")):
                problems.append(f"{where}.source: self_generated text is written by the whole model; use a file or "
                                "dataset source with model.load: streaming")
        elif kind == "prune":
            if s.units not in ("blocks", "width"):
                problems.append(f"{where}.units: {s.units} touches every tensor of the model at once; model.load: "
                                "streaming prunes units: blocks or width")
            alloc = getattr(getattr(s, "allocation", None), "type", None)
            if alloc == "alpha":
                problems.append(f"{where}.allocation: alpha reads the spectra of every weight matrix to plan; use "
                                "allocation: global, uniform or owl with model.load: streaming")
            if getattr(s, "experts", None) is not None or getattr(s, "expert_channels", None) is not None:
                problems.append(f"{where}: expert units are not streamed (mixture-of-experts families are refused)")
        elif kind == "export":
            other = [f for f in s.formats if f != "hf"]
            if other:
                problems.append(f"{where}.formats: {other} — model.load: streaming writes the hf folder only; convert "
                                "model/ to GGUF or vLLM in a second run with load: resident")
    return problems


# ----------------------------------------------------------------------------- load
def load_streaming(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """The meta skeleton of the folder (weights never read here) with its ``SafetensorsWeights`` attached, and the
    tokenizer."""
    from transformers import AutoTokenizer  # lazy: torch-free

    from prunelab.stages.calibration.sequential import SafetensorsWeights, skeleton  # lazy: torch-free
    from prunelab.stages.io.models import resolve_device, resolve_dtype  # lazy: torch-free

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


# ----------------------------------------------------------------------------- prune: deferred compensation
def bias_parts(model: nn.Module, plan: Any) -> dict[str, str]:
    """part (attn | mlp) → config flag, for the parts whose output projections compensation gives a bias (as
    ``add_output_biases`` would: every layer's q/k/v/o or gate/up/down, zero where nothing was folded in)."""
    comp = getattr(getattr(plan, "target", None), "compensation", None)
    if not isinstance(plan, WidthPlan) or comp is None or comp.type == "none":
        return {}
    if comp.type == "optimal" and not comp.bias:
        return {}
    if comp.type not in ("bias", "optimal"):
        raise ValueError(f"compensation: {comp.type} is not applied by the streamed export; use none, bias or optimal")
    ad = adapter_for(model)
    wanted = {"attn": any(r.q_heads for r in plan.layers.values()), "mlp": any(r.mlp for r in plan.layers.values())}
    flags = ad.bias_flags()
    out = {}
    for part, want in wanted.items():
        if want:
            if part not in flags:
                raise ValueError(compensation_refusal(model.config.model_type) or f"{ad.family} cannot hold a {part} bias")
            out[part] = flags[part]
    return out


BIAS_ROLES = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def add_biases(layer: nn.Module, ad: Any, parts: dict[str, str], device: Any = None) -> None:
    """Zero biases on every projection of ``parts`` that has none (meta on a skeleton)."""
    import torch  # lazy: torch-free
    from torch import nn  # lazy: torch-free

    for part in parts:
        for role in BIAS_ROLES[part]:
            lin = ad.linear(layer, role)
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                    device=device or lin.weight.device))


def after_plan(model: nn.Module, plan: Any) -> None:
    """A streamed skeleton after ``apply_plan``: the biases compensation will add (meta) and their config flags, so the
    skeleton's shapes, ``total_params`` and config are those of the model the export writes. No-op when resident."""
    if not is_streamed(model):
        return
    parts = bias_parts(model, plan)
    ad = adapter_for(model)
    for layer in ad.layers:
        add_biases(layer, ad, parts)
    for flag in parts.values():
        setattr(model.config, flag, True)


# ----------------------------------------------------------------------------- export
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class ShardWriter:
    """Safetensors shards in the ``save_pretrained`` layout whose headers are written first, from the names, shapes and
    dtypes of the finished model (a meta skeleton knows them), so each tensor is written to its place the moment it
    exists and nothing is buffered: ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` (one file:
    ``model.safetensors``). ``close`` checks every tensor arrived."""

    def __init__(self, folder: Path, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], max_bytes: int) -> None:
        self.folder, self.spec = folder, spec
        shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in spec.items():
            n = _nbytes(shape, dtype)
            if shards[-1] and size + n > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += n
        count = len(shards)
        self.files = ["model.safetensors"] if count == 1 else \
            [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        self.where: dict[str, tuple[int, int]] = {}  # name → (shard, absolute offset)
        self.handles = []
        for k, names in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                shape, dtype = spec[name]
                n = _nbytes(shape, dtype)
                header[name] = {"dtype": SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")], "shape": list(shape),
                                "data_offsets": [offset, offset + n]}
                offset += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            f = open(folder / self.files[k], "wb")  # noqa: SIM115  (closed in close())
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            start = 8 + len(raw)
            f.truncate(start + offset)
            self.handles.append(f)
            for name in names:
                self.where[name] = (k, start + header[name]["data_offsets"][0])
        self.pending = set(spec)
        self.total = sum(_nbytes(s, d) for s, d in spec.values())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """One tensor, cast to its declared dtype; its shape must be the declared one."""
        if name not in self.spec:
            raise KeyError(f"{name}: not a tensor of the pruned model (the plan and the skeleton disagree)")
        shape, dtype = self.spec[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the pruned skeleton says {tuple(shape)}")
        k, offset = self.where[name]
        data = tensor.detach().to("cpu", dtype).contiguous().reshape(-1).view(_u8()).numpy()
        self.handles[k].seek(offset)
        self.handles[k].write(data.data)
        self.pending.discard(name)

    def close(self) -> dict[str, Any]:
        for f in self.handles:
            f.close()
        if self.pending:
            raise RuntimeError(f"streamed export: {len(self.pending)} tensors never written, e.g. {sorted(self.pending)[:3]}")
        weight_map = {name: self.files[k] for name, (k, _) in self.where.items()}
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return {"shards": len(self.files), "bytes": self.total}


def _u8() -> torch.dtype:
    import torch  # lazy: torch-free

    return torch.uint8


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:

    import torch  # lazy: torch-free

    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


def output_spec(model: nn.Module, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name → (shape, dtype) of every tensor ``save_pretrained`` would write for the (meta) pruned model: its state
    dict in order, a tied head left out."""
    names = dict(model.state_dict(keep_vars=True))
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    skip = {n for n, t in names.items() if tied and head is not None and t is head.weight and n.endswith("head.weight")}
    return {n: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for n, t in names.items() if n not in skip}


def _stage_setting(ctx: Any, kind: str, pick: Any, default: Any) -> Any:
    """A setting of the last stage of ``kind`` in the recipe (the export reads the calibration and score settings)."""
    found = [s for s in ctx.recipe.stages.values() if getattr(s, "type", None) == kind]
    return pick(found[-1]) if found else default


def export_streamed(ctx: Any, cfg: Any) -> dict[str, Any]:
    """``model/`` for a streamed run, one block resident at a time; see the module docstring. Returns what the hf
    export returns (path; ``reload_max_abs_diff`` is None: a reload would hold the whole model) plus the
    structural check and the block timing."""

    import torch  # lazy: torch-free
    from huggingface_hub import ModelCard  # lazy: startup

    from prunelab.stages.calibration.sequential import BoundaryCache, skeleton  # lazy: torch-free
    from prunelab.stages.io.models import DTYPES  # lazy: torch-free

    pruned, plan, weights = ctx.model, ctx.plan, weights_of(ctx.model)
    if plan is not None and not isinstance(plan, (DepthPlan, WidthPlan)):
        raise ValueError(f"streamed export applies depth and width plans; this one is {plan.kind}")
    if isinstance(plan, DepthPlan) and plan.merges:
        raise ValueError("streamed export: LaCo merges read several blocks at once; use load: resident")
    dense = skeleton(weights.folder, next(pruned.parameters()).dtype)
    ad = adapter_for(dense)
    out_dtype = next(pruned.parameters()).dtype if cfg.dtype == "same" else DTYPES[cfg.dtype]
    removed = set(plan.removed_blocks) if isinstance(plan, DepthPlan) else set()
    widths = {int(k): v.model_dump() for k, v in plan.layers.items()} if isinstance(plan, WidthPlan) else {}
    comp = plan.target.compensation if isinstance(plan, WidthPlan) else None
    parts = bias_parts(dense, plan) if plan is not None else {}
    optimal = comp is not None and comp.type == "optimal" and bool(widths)
    shard_mb = cfg.shard_mb if getattr(cfg, "shard_mb", None) is not None else DEFAULT_SHARD_MB
    spec = output_spec(pruned, out_dtype)
    target = ctx.run_dir / "model"
    seconds: list[float] = []
    with atomic_dir(target) as tmp:
        writer = ShardWriter(tmp, spec, int(shard_mb * 2**20))
        try:
            _copy_outer(writer, weights, spec, ad)
            states, prepared, folder = None, {}, None
            if optimal:  # the dense boundary states: the Grams of each block's o_proj/down_proj inputs need them

                folder = Path(tempfile.mkdtemp(prefix="prunelab-export-"))
                budget = _stage_setting(ctx, "calibrate", lambda s: s.pipeline.memory_budget_gb, 4.0) * 2**30 / 2
                size = _stage_setting(ctx, "score", lambda s: s.batch_size, 1)
                states, prepared = _embed_states(ad, weights, ctx.calibration, size, BoundaryCache(budget, folder, "e0"))
            new = 0
            for i in range(ad.num_blocks):
                if i in removed:
                    continue
                t0 = time.perf_counter()
                with weights.block(ad, i):
                    layer = ad.layers[i]
                    grams = None
                    if states is not None:
                        following = BoundaryCache(states.budget, states.folder, f"e{i + 1}")
                        grams = _run_dense(ad, i, layer, states, following, prepared, collect=i in widths)
                        states.clear()
                        states = following
                    if i in widths:
                        _prune_block(dense, ad, i, widths[i], comp, grams, ctx.activation_stats)
                    add_biases(layer, ad, parts)
                    for name, tensor in layer.state_dict().items():
                        writer.write(f"{ad.block_prefix(new)}.{name}", tensor)
                    del grams
                new += 1
                seconds.append(time.perf_counter() - t0)
            if states is not None:
                states.clear()
            if folder is not None:

                shutil.rmtree(folder, ignore_errors=True)
            written = writer.close()
        except BaseException:
            for f in writer.handles:
                f.close()
            raise
        config = pruned.config
        config.dtype = out_dtype
        config.save_pretrained(tmp)
        generation = weights.folder / "generation_config.json"
        if generation.is_file():
            (tmp / "generation_config.json").write_text(generation.read_text())
        ctx.tokenizer.save_pretrained(tmp)
        ModelCard(model_card(ctx)).save(tmp / "README.md")
        check = check_structure(tmp) if cfg.verify else None
    return {"path": str(target), "reload_max_abs_diff": None, "streamed": {
        **written, "structure_check": check, "blocks": len(seconds),
        "seconds_per_block": round(sum(seconds) / max(len(seconds), 1), 3)}}


def _copy_outer(writer: ShardWriter, weights: Any, spec: dict[str, Any], ad: Any) -> None:
    """Embedding, final norm and head (everything outside the blocks), tensor by tensor from the source files."""
    inside = f"{ad.BLOCKS}."
    for name in spec:
        if name.startswith(inside):
            continue
        if name not in weights.where:
            raise KeyError(f"{weights.folder}: tensor {name} not found in the safetensors files")
        with safe_open(str(weights.folder / weights.where[name]), framework="pt", device="cpu") as h:
            writer.write(name, h.get_tensor(name))


def _embed_states(ad: Any, weights: Any, calibration: torch.Tensor, batch_size: int, cache: Any) -> tuple[Any, dict]:
    """x_0 of every calibration batch (in the boundary cache) and the block inputs (masks, rotary) per shape."""
    import torch  # lazy: torch-free

    from prunelab.stages.calibration.blocks import batches  # lazy: torch-free

    prepared: dict[tuple[int, ...], Any] = {}
    with torch.no_grad(), weights.embedding(ad):
        for b, ids in enumerate(batches(calibration, batch_size)):
            x = ad.embed(ids)
            key = tuple(x.shape[:2])
            if key not in prepared:
                prepared[key] = ad.prepare(x)
            cache.put(b, x)
    cache.count = b + 1
    return cache, prepared


class GramSums:
    """The augmented Gram matrix [[Σ x xᵀ, Σ x], [Σ xᵀ, N]] of one linear's inputs in float64 (what
    ``compensation.augmented_gram`` builds from ``ChannelStats``' sums), accumulated in place in its final
    (d+1)×(d+1) buffer: no d×d temporary per batch and no copy when compensating (5632² float64 is 254 MB)."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        import torch  # lazy: torch-free

        x = x.detach().reshape(-1, x.shape[-1]).double()
        d = x.shape[1]
        if self.h is None:
            self.h = torch.zeros(d + 1, d + 1, dtype=torch.float64)
            self.total = torch.zeros(d, dtype=torch.float64)
        self.h[:d, :d].addmm_(x.T, x)
        self.total.add_(x.sum(0))
        self.count += x.shape[0]

    def augmented(self) -> torch.Tensor:
        """The finished buffer, handed over (this object no longer holds it)."""
        h, d = self.h, self.h.shape[0] - 1
        h[:d, d] = self.total
        h[d, :d] = self.total
        h[d, d] = float(self.count)
        self.h = None
        return h


def _run_dense(ad: Any, i: int, layer: nn.Module, states: Any, following: Any, prepared: dict,
               collect: bool) -> dict[str, dict[int, GramSums]] | None:
    """The dense block i on every batch's input state (outputs into ``following``); with ``collect``, the float64
    Gram, sum and count of its o_proj / down_proj inputs (the sums the score pass keeps for a resident run)."""
    import torch  # lazy: torch-free

    sums = {role: GramSums() for role in ("o", "down")} if collect else {}
    handles = [ad.linear(layer, role).register_forward_pre_hook(lambda _m, args, s=s: s.add(args[0]))
               for role, s in sums.items()]
    try:
        with torch.no_grad():  # not inference mode: the Gram buffers are updated in place afterwards
            for b in range(states.count):
                x = states.get(b)
                following.put(b, ad.run_block(i, x, prepared[tuple(x.shape[:2])]))
    finally:
        for h in handles:
            h.remove()
    following.count = states.count
    return {STAT_KEYS[r]: {i: s} for r, s in sums.items()} if collect else None


def lean_optimal(weight: torch.Tensor, bias: torch.Tensor | None, sums: GramSums, removed: list[int],
                 damping: float, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``compensation.optimal_layer`` (the OBS update δW = −W_S (H⁻¹_SS)⁻¹ H⁻¹_S:) with one d×d matrix resident
    besides the Gram itself: the damping added to the diagonal in place, H factored by Cholesky into its own buffer
    (H + λI is positive definite), and only the rows S of H⁻¹ formed (``cholesky_solve`` against the unit vectors of
    S) instead of the whole inverse. The same solution in float64 (a test checks it against ``optimal_layer``)."""
    import torch  # lazy: torch-free

    keep = [j for j in range(weight.shape[1]) if j not in set(removed)]
    h = sums.augmented()
    if not with_bias:
        h = h[:-1, :-1].contiguous()
    s = torch.tensor(removed, dtype=torch.long)
    lam = damping * torch.diagonal(h).mean().clamp_min(1e-12)
    torch.diagonal(h).add_(lam)
    torch.linalg.cholesky(h, out=h)
    unit = torch.zeros(h.shape[0], len(removed), dtype=torch.float64)
    unit[s, torch.arange(len(removed))] = 1.0
    rows = torch.cholesky_solve(unit, h).T  # (H⁻¹)[S, :], H⁻¹ symmetric
    del h, unit
    coef = torch.linalg.solve(rows[:, s], rows)  # (H⁻¹_SS)⁻¹ H⁻¹_S:
    del rows
    if with_bias:
        b0 = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
        w = torch.cat([weight.double(), b0[:, None]], dim=1)
    else:
        w = weight.double()
    out = w - w[:, s] @ coef
    out[:, s] = 0.0
    return (out[:, keep], out[:, -1]) if with_bias else (out[:, keep], None)


def optimal_side(dense: nn.Module, i: int, removed: dict[str, list[int]], grams: dict[str, dict[int, GramSums]],
                 damping: float, with_bias: bool) -> dict[str, torch.Tensor]:
    """``compensation.optimal_compensation`` for block i, through ``lean_optimal``: the side tensors by parameter."""
    from prunelab.stages.surgery.compensation import removed_inputs  # lazy: torch-free

    side = {}
    for _, name, key, lin, idx in removed_inputs(dense, {i: removed}):
        w, b = lean_optimal(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), grams[key][i], idx,
                            damping, with_bias)
        side[f"{name}weight"] = w.to(lin.weight.dtype)
        if b is not None:
            old = b.new_zeros(b.shape) if lin.bias is None else lin.bias.detach().double()
            side[f"{name}bias"] = (b - old).to(lin.weight.dtype)
    return side


def _prune_block(dense: nn.Module, ad: Any, i: int, removed: dict[str, list[int]], comp: Any,
                 grams: dict[str, Any] | None, means: dict[str, Any] | None) -> None:
    """Block i (resident in the dense skeleton) pruned as ``apply_width`` prunes it: compensation computed on the
    dense weights (the same functions), the units sliced, the compensated weights and bias changes put in."""
    import torch  # lazy: torch-free

    from prunelab.stages.surgery.apply import prune_layer_width  # lazy: torch-free
    from prunelab.stages.surgery.compensation import bias_compensation  # lazy: torch-free

    side: dict[str, torch.Tensor] = {}
    if comp is not None and comp.type == "optimal":
        side = optimal_side(dense, i, removed, grams, comp.damping, comp.bias)
    elif comp is not None and comp.type == "bias":
        if means is None:
            raise ValueError("compensation: bias needs activation means from a width `score` stage")
        side = bias_compensation(dense, {i: removed}, means)
    layer = ad.layers[i]
    prune_layer_width(layer, removed, type(ad))
    prefix = f"{ad.block_prefix(i)}."
    params = dict(layer.named_parameters())
    for key, value in side.items():
        if key.endswith(".weight"):
            params[key.removeprefix(prefix)].data.copy_(value)
    for key, value in side.items():
        if key.endswith(".bias"):
            lin = layer.get_submodule(key.removeprefix(prefix).rsplit(".", 1)[0])
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
            lin.bias.data += value.to(lin.bias.dtype)


def check_structure(folder: Path) -> dict[str, Any]:
    """The written folder against the model its config describes, built on meta (the prunelab loader's per-layer
    shapes when present): every tensor present with its shape, none extra. A numeric reload check would hold the whole
    model, which a streamed run never does."""
    import torch  # lazy: torch-free
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: torch-free

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = getattr(config, "prunelab_layer_shapes", None)
    if shapes:
        ad = adapter_for(model)
        for layer, shape in zip(ad.layers, shapes, strict=True):
            ad.resize_layer(layer, shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"])
    expected = {n: tuple(s) for n, (s, _) in output_spec(model, torch.float32).items()}
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    got: dict[str, tuple[int, ...]] = {}
    for f in files:
        with open(folder / f, "rb") as h:
            header = json.loads(h.read(int.from_bytes(h.read(8), "little")))
        got.update({n: tuple(v["shape"]) for n, v in header.items() if n != "__metadata__"})
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
    if missing or extra or wrong:
        raise RuntimeError(f"{folder}: the written tensors do not match config.json (missing {missing[:3]}, "
                           f"unexpected {extra[:3]}, other shapes {wrong[:3]})")
    return {"tensors": len(got), "files": len(files)}
