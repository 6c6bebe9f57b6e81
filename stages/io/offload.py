"""Evaluating a model larger than memory (issue 28 item 5): accelerate's big-model placement on a skeleton built
without weights, the part that does not fit a memory budget left on disk and read back layer by layer per forward.

``model: {source: <save_pretrained folder>, load: offload, memory_budget_gb: 2, offload_dir: null}``:

- the model is built under accelerate's ``init_empty_weights`` from the folder's config (a per-layer-width prunelab
  export is resized layer by layer first, as ``load_pruned`` does), so no weight is allocated;
- ``infer_auto_device_map(max_memory={"cpu": budget})`` with the decoder layer class unsplittable places the
  embedding and the first layers in memory and the rest on ``"disk"`` (accelerate keeps room in the budget for the
  largest layer, which is where an offloaded layer is materialized during its forward);
- the in-memory part is read tensor by tensor from the safetensors shards (never a whole shard: accelerate's
  ``load_checkpoint_and_dispatch`` reads each shard whole, which for 2 GB shards is the budget several times over);
- the disk part stays where it is: by default accelerate's offload index points straight into the folder's
  safetensors shards (no copy); with ``offload_dir`` the disk part is first copied there in accelerate's own
  memory-mapped format (one ``.dat`` per tensor: a faster local disk than the source's, or another dtype than the
  checkpoint's) in a fresh subfolder removed with the model;
- ``dispatch_model`` hangs accelerate's hooks on the modules, so a forward of the model — the evaluate stage's
  perplexity (text and QA) and lm-eval tasks — runs unchanged, each offloaded layer read for its forward and freed.

Cost: every forward reads the disk part once (a window of 512 tokens and a batch of 8 windows cost the same reads),
so evaluate with the largest ``batch_size`` the budget's activations allow. Speed measurements are refused (they
would time the disk). A run with ``load: offload`` holds only evaluate stages: pruning, recovery and export change
weights that are not in memory — prune a model larger than memory with ``load: streaming`` (which evaluates its
source and its export through this same load).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from prunelab.stages.arch import adapter_for
from prunelab.stages.io.streaming import ATTR as STREAMED_ATTR
from prunelab.stages.io.streaming import evaluate_problems, source_problems, stream_folder

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunelab.stages.io.config import ModelConfig

ATTR = "prunelab_offload"  # the attribute of an offloaded model that describes its placement
ALLOWED_STAGES = ("evaluate",)


# ----------------------------------------------------------------------------- validation (torch-free)
def offload_problems(cfg: ModelConfig, stages: dict[str, Any]) -> list[str]:
    """Every reason a recipe cannot run with ``model.load: offload``, each naming the fix (``--dry-run``)."""
    problems = source_problems(cfg)
    if cfg.device != "cpu":
        problems.append(f"model.device: {cfg.device!r} — model.load: offload places weights in CPU memory and on disk "
                        "(tested on CPU only); use device: cpu")
    for key, s in stages.items():
        kind = getattr(s, "type", None)
        where = f"stages.{key}"
        if kind not in ALLOWED_STAGES:
            problems.append(f"{where}: a {kind} stage changes or reads every weight, and model.load: offload keeps most "
                            "of them on disk; remove it (prune a model larger than memory with load: streaming, whose "
                            "evaluate stages use this same offloaded load)")
            continue
        problems += evaluate_problems(where, s, cfg.load)
    return problems


# ----------------------------------------------------------------------------- load
def checkpoint_files(folder: Path) -> dict[str, Path]:
    """tensor name → the safetensors file that holds it (``save_pretrained`` layout, sharded or not)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json; save the model "
                                "with save_pretrained (safetensors)")
    with safe_open(str(single), framework="pt") as h:
        return dict.fromkeys(h.keys(), single)


def empty_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The folder's model with no weights allocated (accelerate's ``init_empty_weights``: parameters on meta, buffers
    such as the rotary frequencies real), per-layer widths (``prunelab_layer_shapes``) applied."""
    from accelerate import init_empty_weights  # lazy: torch-free
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: torch-free

    from prunelab.stages.io.loader import apply_layer_shapes  # lazy: torch-free

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        shapes = getattr(config, "prunelab_layer_shapes", None)
        if shapes:
            apply_layer_shapes(model, shapes)
    if getattr(config, "tie_word_embeddings", False):  # outside: init_empty_weights re-creates registered parameters
        model.tie_weights()
    return model.eval()


def _device_of(name: str, device_map: dict[str, Any]) -> Any:
    """The device ``device_map`` gives a tensor or module name (its longest matching prefix)."""
    probe = name
    while probe not in device_map:
        if not probe:
            raise KeyError(f"{name}: no device in the device map")
        probe = probe.rpartition(".")[0]
    return device_map[probe]


def fixed_mmap_threshold(size: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of ``size`` bytes or more with its own mmap, returned to the system on free.

    Why: an offloaded forward allocates and frees every layer's weights (tens of MB each). glibc's default threshold
    is dynamic — freeing an mmapped block raises it to that block's size (up to 32 MB) — so the next layer's
    16 MB matrices land on the heap, which is not given back: measured on a 3.95 GB model (hidden 2048), resident
    memory grew by ~25 MB per layer and one perplexity pass peaked at 2.44 GB against a 0.59 GB budget; with a fixed
    threshold the same forward stays flat. Setting it once for the process is what ``MALLOC_MMAP_THRESHOLD_`` does.
    False where there is no glibc (other platforms keep their allocator's behaviour)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(-3, size))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def offloaded_model(folder: str | Path, memory_budget_gb: float, offload_dir: str | Path | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """The model of a ``save_pretrained`` folder (prunelab per-layer widths included) with at most
    ``memory_budget_gb`` of its weights in memory and the rest on disk, dispatched with accelerate's hooks; its
    placement in ``model.prunelab_offload``."""
    import torch  # lazy: torch-free
    from accelerate import dispatch_model, infer_auto_device_map  # lazy: torch-free
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device  # lazy: torch-free

    folder = Path(folder)
    files = checkpoint_files(folder)
    fixed_mmap_threshold()
    dtype = dtype or torch.float32
    model = empty_model(folder, dtype)
    ad = adapter_for(model)
    budget = int(memory_budget_gb * 2**30)
    no_split = sorted({type(layer).__name__ for layer in ad.layers})
    device_map = infer_auto_device_map(model, max_memory={"cpu": budget}, no_split_module_classes=no_split, dtype=dtype)

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = f"{ad.head_name()}.weight"
    if tied:  # the head is the embedding's tensor, which stays in memory: no weight of its own to read from disk
        device_map[ad.head_name()] = "cpu"
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    expected |= {n for n, _ in model.named_buffers() if n in model.state_dict()}  # persistent buffers are saved
    missing = sorted(n for n in expected - set(files) if not (tied and n == head) and not ad.is_rotary_buffer(n))
    unexpected = sorted(set(files) - expected)
    if missing or unexpected:
        raise RuntimeError(f"{folder}: the checkpoint does not match the model its config.json describes (missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]})")
    embed = next(n for n, m in model.named_modules() if m is ad.embedding)
    if _device_of(f"{embed}.weight", device_map) == "disk":
        size = ad.embedding.weight.numel() * dtype.itemsize
        raise ValueError(f"model.memory_budget_gb: {memory_budget_gb} GB does not hold the embedding "
                         f"({size / 2**30:.3f} GB: the inputs go to its device) and room for the largest module "
                         "loaded during a forward (a decoder layer or the head); raise it")

    state = model.state_dict()
    sizes = {n: state[n].numel() * dtype.itemsize for n in files}
    del state
    by_file: dict[Path, list[str]] = {}
    disk: list[str] = []
    for name, f in files.items():
        if _device_of(name, device_map) == "disk":
            disk.append(name)
        else:
            by_file.setdefault(f, []).append(name)
    copy = None
    if offload_dir is not None and disk:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        copy = Path(tempfile.mkdtemp(prefix="prunelab-offload-", dir=offload_dir))
    index: dict[str, dict[str, Any]] = {}
    for name in disk:
        if copy is not None:  # accelerate's memory-mapped .dat, one tensor in memory at a time
            with safe_open(str(files[name]), framework="pt", device="cpu") as h:
                offload_weight(h.get_tensor(name).to(dtype), name, str(copy), index=index)
        else:  # read from the shards themselves at each forward
            index[name] = {"safetensors_file": str(files[name]), "weight_name": name,
                           "dtype": str(dtype).removeprefix("torch.")}
    for f, names in by_file.items():  # the in-memory part, tensor by tensor
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for name in names:
                set_module_tensor_to_device(model, name, "cpu", value=h.get_tensor(name), dtype=dtype)
    if tied:
        model.tie_weights()
    if copy is not None:
        save_offload_index(index, str(copy))
        model = dispatch_model(model, device_map, main_device="cpu", offload_dir=str(copy))
        weakref.finalize(model, shutil.rmtree, str(copy), True)
    else:
        model = dispatch_model(model, device_map, main_device="cpu", offload_index=index or None)
    setattr(model, ATTR, {
        "memory_budget_bytes": budget,
        "memory_bytes": sum(v for n, v in sizes.items() if n not in disk),
        "disk_bytes": sum(sizes[n] for n in disk),
        "disk_modules": sorted({m for m, d in device_map.items() if d == "disk"}),
        "disk_read_from": str(copy) if copy is not None else "source shards",
    })
    return model.eval()


def load_offloaded(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """``model.load: offload``: the recipe's folder through ``offloaded_model``, and its tokenizer."""
    from transformers import AutoTokenizer  # lazy: torch-free

    from prunelab.stages.io.models import resolve_device, resolve_dtype  # lazy: torch-free

    problems = source_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    folder = stream_folder(cfg)
    model = offloaded_model(folder, cfg.memory_budget_gb, cfg.offload_dir, resolve_dtype(cfg.dtype, resolve_device(cfg.device)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def streamed_evaluation_model(model: Any, recipe: Any, stage_key: str, run_dir: Path) -> nn.Module | None:
    """What an evaluate stage of a streamed run (``model.load: streaming``, whose model is a meta skeleton) evaluates:
    the source folder when no export precedes the stage (``--dry-run`` refused one after a prune), else the exported
    ``model/``, through ``offloaded_model`` within ``model.memory_budget_gb``. None for any other run."""
    if getattr(model, STREAMED_ATTR, None) is None:
        return None
    keys = list(recipe.stages)
    before = keys[: keys.index(stage_key)] if stage_key in keys else keys
    exported = any(getattr(recipe.stages[k], "type", None) == "export" for k in before)
    folder = run_dir / "model" if exported else stream_folder(recipe.model)
    cfg = recipe.model
    return offloaded_model(folder, cfg.memory_budget_gb, cfg.offload_dir, next(model.parameters()).dtype)


def placement(model: Any) -> dict[str, Any]:
    """``{"offload": what was in memory, what on disk}`` for an offloaded model (the stage's outputs), else empty."""
    where = getattr(model, ATTR, None)
    return {"offload": {k: v for k, v in where.items() if k != "disk_modules"}} if where else {}


def release(model: nn.Module) -> None:
    """Take accelerate's hooks off an offloaded model (its copy on disk goes when the model is collected)."""
    from accelerate.hooks import remove_hook_from_submodules  # lazy: torch-free

    remove_hook_from_submodules(model)
