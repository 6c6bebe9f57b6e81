"""Models larger than memory: a run on a meta-device skeleton whose blocks are read from the safetensors shards only
while a stage needs them, and an export that writes the pruned model block by block (issue 28 item 5).

``model: {source: <save_pretrained folder>, load: streaming}`` changes four places of a run (and how evaluate stages
read the model, below), nothing else:

- load: ``skeleton`` (every tensor on ``meta``) with a ``SafetensorsWeights`` source attached to it;
- score: the sequential pipeline materializes block i for its pass; criteria that read weights (FLAP, Wanda-sp,
  magnitude, Taylor) see each layer resident while they iterate over the layers (``layers_resident``), one at a time;
  the Gram matrices of optimal compensation are NOT collected here (all layers' would be 6.9 GB for a 1.1B model in
  float64): the export collects them block by block; LaCo's trials run from the dense boundary states, the merge
  sources resident while a merge is summed (``prunelab.stages.criteria.laco``);
- prune: plans are indices, made from scores alone (AlphaPruning's weight spectra refused), applied to the skeleton
  (shapes and config only); compensation is deferred (``after_plan`` adds its meta biases and flags);
- export: LaCo's merges replayed first from their sources (``replay_merges``, merged blocks on disk); block i
  materialized, the dense block run on the calibration states (boundary cache) so its
  o_proj/down_proj Grams are collected, the plan's surgery and compensation for block i applied (the same
  ``prune_layer_width`` / ``bias_compensation`` code as a resident run, and ``optimal_compensation``'s arithmetic
  with fewer temporaries: ``lean_optimal``), its tensors
  written into pre-allocated safetensors shards (``ShardWriter``: headers computed from the pruned skeleton's
  shapes), freed. Embedding, final norm and head are copied tensor by tensor.

Refused at ``--dry-run`` (``streaming_problems``): GGUF sources, tiny built-in models, hub ids not in the local cache,
mixture-of-experts families (transformers converts their fused expert tensors on load), ``pipeline: full``,
self-generated calibration, hidden-channel and sublayer pruning, AlphaPruning allocation, recover/iterate stages
(they need the whole model resident), an evaluate stage between prune and export (the pruned model exists only once
exported: "move it after the export stage") or with ``speed`` (it would time the disk), formats other than hf.

Evaluate stages: one before any prune evaluates the source folder, one after the export the exported ``model/`` —
each through accelerate's offloading (``prunelab.stages.io.offload.offloaded_model``: ``model.memory_budget_gb`` of
the weights in memory, the rest read from the shards per forward), loaded for the stage and dropped after it, so one
run prunes, exports and evaluates a model larger than memory.

Where the parts live (rooms import downwards: io < calibration < surgery): this module holds what a streamed run
reads and writes without the model — the recipe checks (``streaming_problems``, torch-free), the shard writer and
the exported folder's check; ``prunelab.stages.calibration.streamed`` the skeleton, its resident layers and the
gradient sums spilled to disk; ``prunelab.stages.surgery.streamed`` the deferred compensation and the block-by-block
export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunelab.stages.arch import adapter_for, family_facts, unsupported_message
from prunelab.stages.io.sources import alias_dirs, classify

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunelab.stages.io.config import ModelConfig

ATTR = "prunelab_weights"  # the attribute of a streamed skeleton that holds its SafetensorsWeights
ALLOWED_STAGES = ("calibrate", "score", "prune", "export", "evaluate")
DEFAULT_SHARD_MB = 2048.0


# ----------------------------------------------------------------------------- validation (torch-free)
def stream_folder(cfg: ModelConfig) -> Path:
    """The local ``save_pretrained`` folder a streaming run reads, or a ValueError naming the fix."""
    src = classify(cfg.source, cfg.gguf_file)
    if src.kind == "gguf":
        raise ValueError(f"model.load: {cfg.load} reads safetensors shards; a GGUF source is dequantised whole on load — "
                         "convert it once (a resident run's export, or save_pretrained) and stream that folder")
    if src.kind == "tiny":
        raise ValueError(f"model.load: {cfg.load} needs a folder on disk; {cfg.source!r} is built from code — save it "
                         "with save_pretrained and give that folder, or use load: resident")
    if src.kind == "alias":
        folder = alias_dirs(src.path)[1]
        if not (folder / "config.json").is_file():
            raise ValueError(f"model.load: {cfg.load}: alias {cfg.source!r} has no converted safetensors copy yet; run "
                             "it once with load: resident (it converts the GGUF), then use that")
        return folder
    if src.kind == "hub":
        from huggingface_hub import try_to_load_from_cache  # lazy: startup

        found = try_to_load_from_cache(src.path, "config.json", revision=cfg.revision)
        if not isinstance(found, str):
            raise ValueError(f"model.load: {cfg.load}: hub model {cfg.source!r} is not in the local Hugging Face cache; "
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
        return [f"model.load: {cfg.load}: {folder} holds no *.safetensors files; save the model with save_pretrained "
                "(safetensors) first, or use load: resident"]
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    facts = family_facts(model_type)
    if facts is None:
        return [f"model.load: {cfg.load}: {unsupported_message(model_type)}"]
    if facts.moe:
        return [f"model.load: {cfg.load}: {model_type} is a mixture of experts, whose checkpoint tensors transformers "
                "converts on load (fused experts): blocks cannot be read as saved; use load: resident"]
    return []


def evaluate_problems(where: str, stage: Any, load: str) -> list[str]:
    """What an evaluate stage cannot do on an offloaded model (``load: offload``, or a streamed run's evaluate)."""
    if getattr(stage, "speed", None) is not None:
        return [f"{where}.speed: with model.load: {load} the model is evaluated with its layers read from disk per "
                "forward, so a speed measurement would time the disk; remove speed and measure it in a run with "
                "load: resident"]
    return []


def streaming_problems(cfg: ModelConfig, stages: dict[str, Any]) -> list[str]:
    """Every reason a recipe cannot run with ``model.load: streaming``, each naming the fix (``--dry-run``)."""
    problems = source_problems(cfg)
    if not any(getattr(s, "type", None) == "export" for s in stages.values()):
        problems.append("model.load: streaming writes the pruned model only in an export stage; add one "
                        "({type: export}) at the end")
    pruned = exported = False  # where along the run each stage sits
    for key, s in stages.items():
        kind = getattr(s, "type", None)
        where = f"stages.{key}"
        if kind not in ALLOWED_STAGES:
            problems.append(f"{where}: a {kind} stage needs the whole model resident, which model.load: streaming never "
                            "holds; remove it (evaluate stages are allowed: they read the source or the exported "
                            "model/ through accelerate's offloading, model.memory_budget_gb)")
            continue
        pruned |= kind == "prune"
        exported |= kind == "export"
        if kind == "evaluate":  # the source before any prune, the export after it: both folders on disk
            if pruned and not exported:
                problems.append(f"{where}: with model.load: streaming the pruned model exists only once the export "
                                "has written it; move this evaluate stage after the export stage")
            problems += evaluate_problems(where, s, "streaming")
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
