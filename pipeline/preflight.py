"""Checks against the file system and model metadata, run after schema validation and before any
model loads (no torch import): missing data files, unreadable model paths, impossible targets,
windows longer than the model's context — and content, read cheaply enough for any model size
(``prunelab.stages.io.content``): data files decoded and parsed from their head (file and line named) and their
tokens bounded against what each stage needs, safetensors headers matched to ``config.json``, devices,
speed settings, an output folder that is a file, a hub id that is not in the local cache.

The model's sizes come from metadata alone (``prunelab.stages.io.sources.model_shape``: config.json, a GGUF
header, the hub cache or an alias's record); each stage config that defines
``check_model(num_layers, total_params, block_params, geometries)`` is asked about them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prunelab.stages.criteria  # noqa: F401
from prunelab.recipe import RecipeBase, RecipeError
from prunelab.stages.arch import (
    compensation_refusal,
    family_facts,
    dense_moe_layers_refusal,
    moe_refusals,
    sublayer_refusal,
    unsupported_message,
)
from prunelab.stages.calibration.sources import MixSource, SelfGeneratedSource, split_counts
from prunelab.stages.core.config import settings_objects
from prunelab.stages.criteria.registry import CRITERIA
from prunelab.stages.evaluation.zeroshot import recipe_task_problems
from prunelab.stages.io.config import TextSource
from prunelab.stages.io.content import (
    jsonl_text_tokens,
    qa_problem,
    qa_tokens,
    read_text_head,
    text_field_problem,
    weights_problems,
)
from prunelab.stages.io.footprint import footprint_lines
from prunelab.stages.io.gguf_export import recipe_gguf_refusals
from prunelab.stages.io import hub as io_hub  # module-qualified: tests stand in for the network probe
from prunelab.stages.io.hub import hub_offline, push_problems
from prunelab.stages.io.named_data import needs_hub, source_problems, test_split_of
from prunelab.stages.io.qa import QATextSource
from prunelab.stages.io.sources import alias_dirs, classify, model_shape, model_type_of, read_config
from prunelab.stages.selection.engines import engine_refusals


def _local_files(stages: Any) -> Iterator[tuple[str, str]]:
    """(dotted field, file) for every local file a setting names: a text source's ``path`` (or a QA
    source's ``qa_text``, which it exposes as ``path``)."""
    for path, node in settings_objects(stages, "stages"):
        fields = type(node).model_fields
        file = getattr(node, "path", None)
        if isinstance(file, str) and ("path" in fields or "qa_text" in fields):
            yield (f"{path}.path" if "path" in fields else f"{path}.qa_text"), file


def _file_problems(recipe: RecipeBase) -> list[str]:
    problems = []
    for where, file in _local_files(recipe.stages):
        p = Path(file).expanduser()
        if not p.is_file():
            problems.append(
                f"{where}: file {file!r} not found (relative paths start at the working directory "
                f"{os.getcwd()}); fix the path or run from the project root"
            )
        elif not os.access(p, os.R_OK):
            problems.append(f"{where}: file {file!r} is not readable; fix its permissions")
    return problems


def _data_problems(recipe: RecipeBase) -> list[str]:
    """Every local data file a stage reads, decoded (and parsed, for JSONL) from its head, and counted against the
    tokens the stage needs from it: an empty, binary or too-short text, a bad JSON line, a row without the text
    field or with a bad ``answerKey`` is named with its file and line before a model loads."""
    read: dict[str, Any] = {}
    bad: set[str] = set()  # files already refused for their content
    problems: list[str] = []
    needs: list[tuple[str, Any, int, str]] = []  # (setting, source, tokens needed, what needs them and the fix)
    fields: dict[int, tuple[str, ...]] = {}  # id(TextSource) → the JSONL fields it reads (default: its text_field)

    def need_windows(where: str, source: Any, n: int, seq_len: int) -> None:
        if isinstance(source, MixSource):
            counts = split_counts([p.weight for p in source.mix], n)
            for i, (part, count) in enumerate(zip(source.mix, counts, strict=True)):
                if count == 0:
                    problems.append(f"{where}.mix.{i}.weight: {part.weight} is {part.weight / sum(p.weight for p in source.mix):.2g} "
                                    f"of the weights, which gives 0 of the {n} windows; raise it or drop the part")
                else:
                    need_windows(f"{where}.mix.{i}.source", part.source, count, seq_len)
        elif isinstance(source, SelfGeneratedSource):
            prompt = source.self_generated.prompt
            if not isinstance(prompt, str):
                needs.append((f"{where}.self_generated.prompt", prompt, source.self_generated.prompt_tokens + 1,
                              "prompt windows of prompt_tokens; lower prompt_tokens or use more text"))
        elif isinstance(source, (TextSource, QATextSource)):
            needs.append((where, source, seq_len + 1, f"one window of seq_len={seq_len}; lower seq_len or use more text"))
            if n * seq_len > seq_len + 1:
                needs.append((where, source, n * seq_len, f"{n} windows × seq_len {seq_len} = {n * seq_len} tokens of "
                              "text (fewer repeats the same text); lower num_samples or seq_len, or use more text"))

    for path, node in settings_objects(recipe.stages, "stages"):
        names = type(node).model_fields
        if {"source", "num_samples", "seq_len"} <= set(names) and getattr(node, "sampling", "windows") == "windows":
            need_windows(f"{path}.source", node.source, node.num_samples, node.seq_len)
        elif {"source", "seq_len", "max_tokens"} <= set(names):  # perplexity: at least one window
            needs.append((f"{path}.source", node.source, node.seq_len, f"one window of seq_len={node.seq_len}; lower "
                          "seq_len or use more text"))
        elif {"source", "format", "seq_len"} <= set(names) and isinstance(node.source, TextSource):  # recovery data
            if node.format == "alpaca":
                fields[id(node.source)] = ("instruction", "output")
            else:
                needs.append((f"{path}.source", node.source, node.seq_len, f"one training block of seq_len={node.seq_len}; "
                              "lower seq_len or use more text"))
    for path, node in settings_objects(recipe.stages, "stages"):
        if not isinstance(node, (TextSource, QATextSource)) or node.path is None or not Path(node.path).is_file():
            continue  # a missing file is _file_problems'
        qa = isinstance(node, QATextSource)
        jsonl = qa or not node.path.endswith(".txt")
        key = f"{node.path}\0{jsonl}"
        try:
            facts = read.get(key) or read.setdefault(key, read_text_head(node.path, jsonl))
        except OSError as exc:
            problems.append(f"{path}: cannot read {node.path!r} ({exc.strerror}); fix the path or its permissions")
            continue
        where = f"{path}.qa_text" if qa else f"{path}.path"
        if facts.problem is not None:
            problems.append(f"{where}: {facts.problem}")
            bad.add(node.path)
            continue
        if qa:
            problem = qa_problem(facts, node.path)
        else:
            wanted = fields.get(id(node), (node.text_field,))
            problem = next((p for f in wanted if jsonl and (p := text_field_problem(
                facts, node.path, f, f"{path}.text_field" if f == node.text_field else f"the field {f!r}"))), None)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            bad.add(node.path)
    counted: set[str] = set()
    for where, source, tokens, what in needs:
        if getattr(source, "path", None) is None or source.path in bad or where in counted or not Path(source.path).is_file():
            continue
        qa = isinstance(source, QATextSource)
        facts = read.get(f"{source.path}\0{qa or not source.path.endswith('.txt')}")
        if facts is None or facts.problem is not None:
            continue
        if qa:
            most = qa_tokens(facts, source.template, source.join)
        elif source.path.endswith(".txt"):
            most = facts.max_tokens
        else:
            most = jsonl_text_tokens(facts, source.text_field, source.join)
        if most is not None and most < tokens:
            counted.add(where)
            problems.append(f"{where}: {source.path!r} holds at most {most} tokens (its UTF-8 bytes), and this stage "
                            f"needs {what}")
    return problems


_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|hpu|npu|meta)(?::(\d+))?$")


def _device_problems(device: str) -> list[str]:
    """``model.device`` parsed as ``torch.device`` would (without importing torch: two seconds), and a GPU asked
    for where none is visible."""
    if device == "auto":
        return []
    m = _DEVICE.match(device)
    if m is None:
        return [f"model.device: {device!r} is not a device; use cpu, cuda, cuda:N, mps or auto (GPU when present)"]
    kind, index = m.group(1), int(m.group(2) or 0)
    if kind == "cuda":
        count = _cuda_count()
        if count == 0:
            return [f"model.device: {device!r} but no CUDA device is visible; use device: cpu or auto"]
        if count is not None and index >= count:
            return [f"model.device: {device!r} but {count} CUDA device(s) are visible (cuda:0 … cuda:{count - 1}); "
                    "choose one of them"]
    if kind == "mps" and sys.platform != "darwin":
        return [f"model.device: {device!r} is Apple's GPU, not on this machine; use device: cpu or auto"]
    return []


def _cuda_count() -> int | None:
    """Visible CUDA devices: torch's answer when torch is already imported, else the driver's device files and
    CUDA_VISIBLE_DEVICES (None: unknown)."""
    if "torch" in sys.modules:
        import torch  # lazy: torch-free

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    nodes = [p for p in Path("/dev").glob("nvidia[0-9]*")] if Path("/dev").is_dir() else []
    if not nodes:
        return 0 if sys.platform.startswith("linux") else None
    return min(len(nodes), len(visible.split(","))) if visible else len(nodes)


def _speed_problems(recipe: RecipeBase) -> list[str]:
    """Speed settings a measurement cannot run with (a batch of 0 sequences)."""
    problems = []
    for path, node in settings_objects(recipe.stages, "stages"):
        sizes = getattr(node, "batch_sizes", None)
        if "batch_sizes" in type(node).model_fields and isinstance(sizes, list):
            bad = [b for b in sizes if b < 1]
            if bad:
                problems.append(f"{path}.batch_sizes: {bad} — a batch holds at least 1 sequence; give sizes ≥ 1, e.g. [1, 8]")
    return problems


def _output_problems(recipe: RecipeBase) -> list[str]:
    """An output_dir (or a folder above it) that is a file, or a run directory that is one."""
    run_dir = recipe.run_dir
    for p in [run_dir, *run_dir.parents]:
        if p.exists():
            if not p.is_dir():
                what = "the run directory" if p == run_dir else "output_dir" if p == run_dir.parent else "a folder above output_dir"
                return [f"output_dir: {what} {str(p)!r} is a file, not a folder; choose another output_dir (--output-dir) or name"]
            if not os.access(p, os.W_OK | os.X_OK):
                return [f"output_dir: {str(p)!r} is not writable; choose another output_dir (--output-dir)"]
            break
    return []


def _weights_problems(src: Any, revision: str | None) -> list[str]:
    """A local (or hub-cached) model folder's weights opened by their headers and matched to its config.json."""
    if src.kind == "local":
        folder = Path(src.path)
    elif src.kind == "alias":
        folder = alias_dirs(src.path)[1]
        if not (folder / "config.json").is_file():
            return []
    else:
        return []
    try:
        return weights_problems(folder, read_config(folder / "config.json"))
    except OSError as exc:
        return [f"model.source: cannot read the weights in {folder} ({exc}); fix the files or their permissions"]


def _hub_problems(src: Any, revision: str | None, probe: bool) -> list[str]:
    """A hub id found in the local Hugging Face cache has its weights checked like a local folder. One not there
    is refused at once where it cannot be downloaded — HF_HUB_OFFLINE set, or (``probe``: before a real run) the
    hub unreachable — instead of a network timeout close to a minute later, inside the load stage."""
    from huggingface_hub import try_to_load_from_cache  # lazy: startup

    wanted = src.gguf_file or "config.json"
    try:
        found = try_to_load_from_cache(src.path, wanted, revision=revision)
    except ValueError as exc:
        return [f"model.source: {src.path!r} is not a valid hub id ({exc}); give 'org/name', a local path or an alias"]
    if isinstance(found, str):
        if probe and not _offline() and _hub_unreachable() is not None:
            io_hub.go_offline()  # cached, hub unreachable: read the cache now, not after a minute of retries
        if src.gguf_file is None:
            folder = Path(found).parent
            if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
                return weights_problems(folder, read_config(Path(found)))
            return [f"model.source: the hub model {src.path!r} is only partly in the local cache (no weights); fetch "
                    f"it with `hf download {src.path}` (`huggingface-cli download` before huggingface_hub 1.0), or give a local folder path"]
        return []
    fix = (f"fetch it where there is a network with `hf download {src.path}` (`huggingface-cli download {src.path}` "
           "with huggingface_hub before 1.0; runs then read the cache "
           "with no network; HF_HUB_OFFLINE=1 makes sure of it), or give a local folder path or an alias")
    if _offline():
        return [f"model.source: the hub model {src.path!r} ({wanted}) is not in the local Hugging Face cache and "
                f"HF_HUB_OFFLINE is set, so it cannot be downloaded; {fix}"]
    if probe and (why := _hub_unreachable()) is not None:
        return [f"model.source: the hub model {src.path!r} ({wanted}) is not in the local Hugging Face cache and the hub "
                f"cannot be reached ({why}); {fix}"]
    return []


def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set the way huggingface_hub reads it."""
    return hub_offline()


def _hub_unreachable() -> str | None:
    """Why the hub's host cannot be reached (name lookup and one TCP connect within a second; one answer per
    process), or None. Asked only where something would be downloaded: without a network the libraries' retries
    take close to a minute to fail."""
    return io_hub.hub_unreachable()


def _dataset_problems(recipe: RecipeBase, probe: bool) -> list[str]:
    """Every ``{dataset: …}`` text source readable here: a named one (wikitext2, arc-easy) from its local file, else
    through ``datasets`` — installed, and cached or online (prunelab.stages.io.named_data); said before a model loads,
    not as a network timeout inside a stage."""
    problems: list[str] = []
    for path, node in settings_objects(recipe.stages, "stages"):
        if isinstance(node, TextSource) and node.dataset is not None:
            problems += [p for p in source_problems(node, path, probe) if p not in problems]
    hub = any(needs_hub(node) for _, node in settings_objects(recipe.stages, "stages") if isinstance(node, TextSource))
    if probe and hub and not problems and not hub_offline(datasets=True) and _hub_unreachable() is not None:

        io_hub.go_offline()  # every dataset is cached and the hub is unreachable: datasets reads the cache without retrying
    return problems


def _sources_in(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, text source) for every file or dataset text under a calibration or training source."""
    for where, obj in settings_objects(node, path):
        if isinstance(obj, (TextSource, QATextSource)):
            yield where, obj


def _test_split_problems(recipe: RecipeBase) -> list[str]:
    """Calibration and recovery read valid/train text only: a test split (``split: test``, or a file named test)
    under a calibration source, a self-generated prompt or recovery data is refused. Perplexity is reported on test
    text; pruning or training on it leaks the answer into the measurement (../shared/data/README.md)."""
    problems = []
    for path, node in settings_objects(recipe.stages, "stages"):
        names = set(type(node).model_fields)
        calibration = {"source", "num_samples", "seq_len"} <= names
        training = {"source", "format", "seq_len"} <= names
        if not (calibration or training):
            continue
        for where, source in _sources_in(node.source, f"{path}.source"):
            why = test_split_of(source)
            if why is not None:
                use = "calibration" if calibration else "recovery training"
                problems.append(f"{where}: {why} is test text, and {use} reads valid/train text only (perplexity is "
                                "reported on test; tuning on it leaks); use split: validation or train, or the valid "
                                "file (e.g. ../shared/data/wikitext2/valid.txt)")
    return problems


def _lengths(stages: Any) -> Iterator[tuple[str, int]]:
    """(dotted field, tokens) for every window length a stage asks of the model: each ``seq_len``
    (calibration windows, perplexity windows, recovery blocks) and a speed test's prompt + new tokens."""
    for path, node in settings_objects(stages, "stages"):
        fields = type(node).model_fields
        if "prompt_len" in fields and "new_tokens" in fields:
            yield f"{path}.prompt_len + new_tokens", node.prompt_len + node.new_tokens
        if isinstance(getattr(node, "seq_len", None), int) and "seq_len" in fields:
            yield f"{path}.seq_len", node.seq_len


def _family_problems(recipe: RecipeBase, model_type: str | None, config: dict[str, Any] | None = None) -> list[str]:
    """A model_type without an architecture adapter; compensation whose bias the family cannot hold."""
    if model_type is None:
        return []
    if family_facts(model_type) is None:
        return [f"model.source: {unsupported_message(model_type)}"]
    problems = []
    refusal = compensation_refusal(model_type)
    for path, node in settings_objects(recipe.stages, "stages"):
        kind = getattr(node, "type", None) if path.endswith(".compensation") else None
        if refusal and (kind == "bias" or (kind == "optimal" and getattr(node, "bias", False))):
            problems.append(f"{path}: {kind} compensation — {refusal}")
    for key, stage in recipe.stages.items():  # expert units on a dense model, dense MLP units on a MoE model
        sub = sublayer_refusal(model_type, stage)
        if sub:
            problems.append(f"stages.{key}: {sub}")
        if getattr(stage, "type", None) == "prune":
            problems += [f"stages.{key}.{msg}" for msg in moe_refusals(model_type, stage)]
            problems += [f"stages.{key}.{msg}" for msg in engine_refusals(model_type, stage)]
    problems += recipe_gguf_refusals(model_type, recipe, config)
    return problems


def _model_problems(recipe: RecipeBase, shape: Any) -> list[str]:
    problems = _family_problems(recipe, shape.model_type, shape.config)
    refusal = dense_moe_layers_refusal(shape.model_type, list(shape.dense_mlp_layers))
    if refusal:
        problems.append(f"model.source: {refusal}")
    counts = shape.param_counts()
    total, block = counts if counts is not None else (None, None)
    for key, stage in recipe.stages.items():
        check = getattr(stage, "check_model", None)
        if check is not None:
            problems.extend(f"stages.{key}: {msg}" for msg in check(shape.num_layers, total, block, None))
    if shape.max_positions:
        for where, tokens in _lengths(recipe.stages):
            if tokens > shape.max_positions:
                problems.append(
                    f"{where}: {tokens} tokens exceed the model's context (max_position_embeddings = "
                    f"{shape.max_positions}); choose at most {shape.max_positions}"
                )
    return problems


def preflight(recipe: RecipeBase, probe_hub: bool = False) -> dict[str, Any]:
    """Raise :class:`RecipeError` listing every problem; return what was learned about the model
    (``num_layers``, ``total_params``, ``block_params``, ``max_positions``; None where unknown).
    ``probe_hub``: where a hub id or a dataset is not in its cache, a one-second connect check says whether the hub
    can be reached; if not, it is refused at once (with the fix) instead of after the libraries' minute of retries,
    and where everything is cached the process goes offline to read the caches (the CLI probes at --dry-run too)."""
    problems = _file_problems(recipe) + _data_problems(recipe) + _device_problems(recipe.model.device)
    problems += _speed_problems(recipe) + _output_problems(recipe)
    problems += _test_split_problems(recipe) + _dataset_problems(recipe, probe_hub)
    shape = None
    try:
        src = classify(recipe.model.source, recipe.model.gguf_file)
        if src.kind == "hub":
            problems += _hub_problems(src, recipe.model.revision, probe_hub)
        else:
            problems += _weights_problems(src, recipe.model.revision)
        shape = model_shape(src, recipe.model.revision)
        if shape is None and src.kind == "local":  # sizes under other names (gpt2's n_layer): still check the family
            problems += _family_problems(recipe, model_type_of(src))
    except (OSError, ValueError) as exc:
        problems.append(str(exc))
    if shape is not None:
        problems += _model_problems(recipe, shape)
    problems += recipe_task_problems(recipe)  # lm-eval task names (cached index) and, offline, their data
    problems += [p for k, c in recipe.stages.items() for p in push_problems(getattr(c, "push_to_hub", None), f"stages.{k}")]
    if problems:
        raise RecipeError(problems)
    counts = shape.param_counts() if shape is not None else None
    return {
        "num_layers": shape.num_layers if shape is not None else None,
        "total_params": counts[0] if counts else None,
        "block_params": counts[1] if counts else None,
        "max_positions": shape.max_positions if shape is not None else None,
    }


def needs_grad(names: list[str]) -> bool:
    """Whether any of these criteria reads gradients (its registered ``needs``; by name where it is not registered)."""
    def one(name: str) -> bool:
        for kind in ("depth", "width"):
            try:
                return "grad" in CRITERIA.get(kind, name).needs
            except Exception:  # noqa: BLE001 (not a criterion of that kind)
                continue
        return "taylor" in name

    return any(one(n) for n in names)


def footprint(recipe: RecipeBase) -> list[str]:
    """What --dry-run says about the download and the memory (prunelab.stages.io.footprint; docs/data.md)."""
    return footprint_lines(recipe, needs_grad=needs_grad)
