"""What a file holds, read cheaply enough for ``--dry-run`` at any size (no torch, no tokenizer, no tensor data).

- Text and JSONL data files: the first :data:`HEAD_BYTES` are decoded (UTF-8, no NUL bytes) and, for JSONL,
  parsed line by line, so an empty, binary or malformed file is named with its line before a model loads.
  Token counts are bounded from above by UTF-8 bytes: every tokenizer prunelab meets (byte-level BPE,
  SentencePiece with byte fallback) spends at least one byte per token, plus a few special tokens. A bound
  that never over-refuses beats an estimate that sometimes refuses good text; the readers' own errors catch
  what the bound lets through, as clean messages.
- Safetensors weights: each file's 8-byte header length and JSON header are read (never the tensor data),
  checked against the file's size (a truncated or garbage file is refused) and against ``config.json``
  (blocks present, embedding shape, parameter count).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.stages.arch import adapter_class, family_facts
from prunelab.stages.arch.base import ArchAdapter
from prunelab.stages.io.sources import shape_from_config

HEAD_BYTES = 8 << 20  # decoded and parsed per data file: well under a second, whatever the file's size
SPECIAL_TOKENS = 4  # BOS / a SentencePiece space prefix / EOS: tokens that cover no byte of the text
MAX_HEADER = 100 << 20  # safetensors refuses headers above 100 MB too


@dataclass
class TextFacts:
    """What a data file's head showed: the problem (None: fine), and an upper bound of its tokens
    (None when only part of it was read and the bound would be the file size anyway)."""

    problem: str | None = None
    max_tokens: int | None = None
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (line number, row) for JSONL files
    complete: bool = True  # the whole file was read


def _decoded(path: Path) -> tuple[str | None, str, bool]:
    """(problem or None, decoded head, whether the head is the whole file)."""
    size = path.stat().st_size
    if size == 0:
        return f"file {str(path)!r} is empty; give a file with text", "", True
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    complete = len(head) >= size
    if (nul := head.find(b"\x00")) >= 0:
        return (f"file {str(path)!r} is binary, not text (a NUL byte at offset {nul}); give a UTF-8 .txt or .jsonl file",
                "", complete)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not complete and exc.start >= len(head) - 3:  # a character cut by the head's end
            text = head[: exc.start].decode("utf-8")
        else:
            line = head[: exc.start].count(b"\n") + 1
            return (f"file {str(path)!r} is not UTF-8 text (byte 0x{head[exc.start]:02x} at offset {exc.start}, line "
                    f"{line}); re-save it as UTF-8", "", complete)
    if not text.strip() and complete:
        return f"file {str(path)!r} holds only whitespace; give a file with text", "", complete
    return None, text, complete


def read_text_head(path: str | Path, jsonl: bool) -> TextFacts:
    """Decode (and for JSONL parse) the head of a data file; the first problem found, with its line number."""
    path = Path(path)
    problem, text, complete = _decoded(path)
    if problem is not None:
        return TextFacts(problem, complete=complete)
    if not jsonl:
        return TextFacts(None, len(text.encode("utf-8")) + SPECIAL_TOKENS if complete else None, complete=complete)
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array (instruction data)
        if not complete:
            return TextFacts(None, None, complete=False)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            return TextFacts(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return TextFacts(f"file {str(path)!r} is not a JSON list of objects; give one object per row")
        return TextFacts(None, len(text.encode("utf-8")) + SPECIAL_TOKENS, [(i + 1, r) for i, r in enumerate(rows)])
    lines = text.split("\n")
    if not complete:
        lines = lines[:-1]  # the last line may be cut by the head's end
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return TextFacts(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno}); each line must be one "
                             "JSON object", complete=complete)
        if not isinstance(row, dict):
            return TextFacts(f"{path}:{number}: a JSON {type(row).__name__}, not an object; each line must be one JSON "
                             "object like {\"text\": \"...\"}", complete=complete)
        rows.append((number, row))
    if not rows and complete:
        return TextFacts(f"file {str(path)!r} has no rows; give one JSON object per line")
    return TextFacts(None, None, rows, complete)


def text_field_problem(facts: TextFacts, path: str, key: str, setting: str) -> str | None:
    """The first JSONL row without ``key`` (the field the text is read from)."""
    for number, row in facts.rows:
        if key not in row:
            return f"{path}:{number}: the row has no field {key!r} (it has {sorted(row)}); set {setting} to the field holding the text"
    return None


def jsonl_text_tokens(facts: TextFacts, key: str, join: str) -> int | None:
    """Upper bound of the tokens of a JSONL text source (its rows' text joined), when the whole file was read."""
    if not facts.complete:
        return None
    texts = [str(row.get(key, "")) for _, row in facts.rows]
    return len(join.join(texts).encode("utf-8")) + SPECIAL_TOKENS


def qa_problem(facts: TextFacts, path: str) -> str | None:
    """The first QA row without a question or a readable correct answer (ARC layout or {question, answer})."""
    for number, row in facts.rows:
        where = f"{path}:{number}"
        if "question" not in row:
            return f"{where}: the row has no 'question' (it has {sorted(row)}); give ARC rows or {{question, answer}}"
        if "answer" in row and "choices" not in row:
            continue
        choices = row.get("choices")
        if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) or not isinstance(choices.get("label"), list):
            return (f"{where}: the row has neither 'answer' nor ARC 'choices' {{text: [...], label: [...]}}; "
                    "give ARC rows or {question, answer}")
        if "answerKey" not in row:
            return f"{where}: the ARC row has no 'answerKey'; add the correct choice's label"
        if row["answerKey"] not in choices["label"]:
            return (f"{where}: answerKey {row['answerKey']!r} is not one of the choice labels {choices['label']}; "
                    "fix the row")
        if choices["label"].index(row["answerKey"]) >= len(choices["text"]):
            return f"{where}: answerKey {row['answerKey']!r} has no choice text; fix the row"
    return None


def qa_tokens(facts: TextFacts, template: str, join: str) -> int | None:
    """Upper bound of the tokens of a QA file rendered as text, when the whole file was read."""
    if not facts.complete:
        return None
    total = 0
    for _, row in facts.rows:
        if "answer" in row and "choices" not in row:
            answer = str(row["answer"])
        else:
            try:
                answer = str(row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])])
            except (KeyError, ValueError, TypeError, IndexError):
                answer = ""
        total += len(template.format(question=str(row.get("question", "")).strip(), answer=answer.strip()).encode("utf-8"))
    return total + len(join.encode("utf-8")) * max(0, len(facts.rows) - 1) + SPECIAL_TOKENS


# ---------------------------------------------------------------- safetensors weights

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def safetensors_header(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(tensor name → {dtype, shape, data_offsets}, None) or (None, the problem): the header only, checked against
    the file's size, so a truncated, empty or garbage file is refused without reading tensor data."""
    size = path.stat().st_size
    hint = "re-download or re-export the model"
    if size < 8:
        return None, f"{path} is {size} bytes, too short for a safetensors file; {hint}"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or 8 + n > size:
            return None, f"{path} is not a safetensors file (its header length {n} does not fit its {size} bytes); {hint}"
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, f"{path} is not a safetensors file (its header is not JSON); {hint}"
    if not isinstance(header, dict):
        return None, f"{path} is not a safetensors file (its header is not a JSON object); {hint}"
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            width = _DTYPE_BYTES.get(info["dtype"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
        except (KeyError, TypeError, ValueError):
            return None, f"{path}: tensor {name!r} has a malformed header entry; {hint}"
        if width is not None and stop - start != count * width:
            return None, f"{path}: tensor {name!r} has {stop - start} bytes for shape {info['shape']} {info['dtype']}; {hint}"
        end = max(end, int(stop))
    if 8 + n + end > size:
        return None, (f"{path} is truncated: its header describes {8 + n + end:,} bytes, the file has {size:,}; {hint}")
    return header, None


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def weights_problems(folder: Path, config: dict[str, Any], where: str = "model.source") -> list[str]:
    """A local model folder's weight files against its ``config.json``: present, complete (headers vs sizes),
    and of the model the config describes (every block present, embedding [vocab, hidden], parameter count)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return [f"{where}: {index} is not a safetensors index (no weight_map); re-download the model"]
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        bins = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
        if bins:
            return [f"{where}: {folder}/{b} is not a zip (torch.save) file; re-download the model"
                    for b in bins if not _is_zip(folder / b)]
        return [f"{where}: {folder} has config.json but no weights (model.safetensors or pytorch_model.bin); "
                "copy the weights into the folder or give the folder that holds them"]
    tensors: dict[str, dict[str, Any]] = {}
    problems = []
    for name in files:
        file = folder / name
        if not file.is_file():
            problems.append(f"{where}: {file} is listed in {index.name} but missing; re-download the model")
            continue
        header, problem = safetensors_header(file)
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            tensors.update(header or {})
    if problems:
        return problems
    if weight_map is not None and (missing := sorted(set(weight_map) - set(tensors))):
        return [f"{where}: {len(missing)} tensors listed in {index.name} are in none of its files (e.g. {missing[0]!r}); "
                "re-download the model"]
    return _match_config(folder, tensors, config, where)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _match_config(folder: Path, tensors: dict[str, dict[str, Any]], config: dict[str, Any], where: str) -> list[str]:
    cfg = config.get("text_config", config) if "num_hidden_layers" not in config else config
    fix = f"the weights in {folder} are not the model its config.json describes; give matching files"
    layers = cfg.get("num_hidden_layers")
    found = {int(m.group(1)) for name in tensors if (m := _LAYER.search(name))}
    if isinstance(layers, int) and found and (missing := sorted(set(range(layers)) - found)):
        return [f"{where}: config.json has {layers} blocks but the weights have none for block(s) {missing[:8]}; {fix}"]
    ad = adapter_class(cfg.get("model_type")) if family_facts(cfg.get("model_type")) else ArchAdapter  # the names
    embed_module = ad.EMBED.rsplit(".", 1)[-1]  # matched with or without the model's prefix
    embed = next((info for name, info in tensors.items() if name.endswith(f"{embed_module}.weight")), None)
    vocab, hidden = cfg.get("vocab_size"), cfg.get("hidden_size")
    if embed is not None and isinstance(vocab, int) and isinstance(hidden, int) and list(embed["shape"]) != [vocab, hidden]:
        return [f"{where}: {embed_module} is {embed['shape']} but config.json says vocab_size × hidden_size = "
                f"[{vocab}, {hidden}]; {fix}"]
    if "prunelab_layer_shapes" in config:  # per-layer widths: the uniform count below does not describe it
        return []
    shape = shape_from_config(config)
    counts = shape.param_counts() if shape is not None else None
    if counts is None:
        return []
    have = sum(_numel(info["shape"]) for name, info in tensors.items() if not ad.is_rotary_buffer(name))
    head = next((info for name, info in tensors.items() if name == ad.head_param()), None)
    tied_extra = _numel(head["shape"]) if head is not None and shape.tie_word_embeddings else 0
    if have - tied_extra != counts[0]:
        return [f"{where}: the weights hold {have - tied_extra:,} parameters, config.json describes {counts[0]:,}; {fix}"]
    return []


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
