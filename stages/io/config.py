"""Where a model and text come from: the settings every room that reads a model or text shares."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from prunelab.stages.core.config import InputFile, PathStr, StrictModel
from prunelab.stages.io.named_data import resolve
from prunelab.stages.io.offload import offload_problems
from prunelab.stages.io.streaming import streaming_problems


class TextSource(StrictModel):
    """Where text comes from: a `datasets` name/config/split, or a local .txt / .jsonl file."""

    dataset: str | None = Field(None, description="datasets name, e.g. 'wikitext'")
    config: str | None = Field(None, description="datasets config, e.g. 'wikitext-2-raw-v1'")
    split: str = Field("train", description="datasets split, e.g. 'test'")
    data_files: InputFile | list[InputFile] | None = Field(None, description="for builders like 'json'/'text': local files")
    path: InputFile | None = Field(None, description="local .txt or .jsonl file (relative to the working directory)")
    text_field: str = Field("text", description="column / JSON key holding the text")
    join: str = Field("\n\n", description="separator used to join rows before tokenizing")

    @model_validator(mode="after")
    def _one_source(self) -> TextSource:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of `dataset` (a datasets name) or `path` (a local .txt/.jsonl file)")
        if self.path is not None and not self.path.endswith((".txt", ".jsonl", ".json")):
            raise ValueError(f"path {self.path!r}: only .txt and .jsonl files are supported; convert it or use `dataset:`")
        return self

    def resolved_input_file(self) -> str | None:
        """The local file a named dataset (``dataset: wikitext2``) is read from, so ``--resume`` fingerprints it like
        a ``path``; None for a path, a Hub dataset or a name without a local copy (an unknown split is preflight's)."""
        if self.dataset is None:
            return None
        try:
            found = resolve(self)
        except ValueError:
            return None
        return str(found.local) if found is not None and found.local is not None else None

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        return ":".join(x for x in (self.dataset, self.config, self.split) if x)


class ModelConfig(StrictModel):
    """The model to prune: a hub id, a local directory, a .gguf file, or a built-in alias."""

    source: PathStr = Field(..., description="hub id, local dir, path to a .gguf, or alias (e.g. 'smollm2-135m')")
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` (a dir or hub repo)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="'auto': bfloat16 on a GPU that supports it, else float32"
    )
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:0' or 'auto' (GPU when present)")
    attn_implementation: Literal["sdpa", "eager"] | None = None
    revision: str | None = None
    # added later: left out of dumps at its default, so older run directories keep their chain hashes
    LATER_FIELDS: ClassVar[dict[str, Any]] = {"load": "resident", "memory_budget_gb": 4.0, "offload_dir": None}
    # where an offloaded evaluation keeps the weights, not what they are: a new budget restores the finished stages
    NOT_HASHED: ClassVar[frozenset[str]] = frozenset({"memory_budget_gb", "offload_dir"})
    load: Literal["resident", "streaming", "offload"] = Field(
        "resident", description="resident: the whole model in memory; streaming: a meta-device skeleton, each block's "
        "weights read from the safetensors shards when a stage needs it and written block by block by the export "
        "(models larger than memory; needs pipeline: sequential; prunelab.stages.io.streaming); offload: evaluate only, "
        "memory_budget_gb of the weights in memory and the rest read from disk per forward (prunelab.stages.io.offload)")
    memory_budget_gb: float = Field(4.0, gt=0, description="load: offload (and the evaluate stages of load: streaming): "
                                    "the weights held in memory, room for one decoder layer included; the rest on disk")
    offload_dir: PathStr | None = Field(None, description="load: offload / streaming evaluate: copy the weights past the "
                                        "budget into this folder (accelerate's memory-mapped files; removed after); "
                                        "none: read them from the source's safetensors shards, no copy")

    @model_validator(mode="after")
    def _offload_settings(self) -> ModelConfig:
        unused = [f for f in ("memory_budget_gb", "offload_dir") if f in self.model_fields_set]
        if unused and self.load == "resident":
            raise ValueError(f"{unused[0]}: only read with load: offload or streaming (where models larger than memory "
                             "are evaluated); remove it or set load")
        return self

    def check_stages(self, stages: dict[str, Any]) -> list[str]:
        """Rules between the model's settings and the stages (the recipe's cross-stage check): ``load: streaming``
        allows only what one block resident can do (``prunelab.stages.io.streaming.streaming_problems``), ``load:
        offload`` only evaluation (``prunelab.stages.io.offload.offload_problems``)."""
        if self.load == "offload":
            return offload_problems(self, stages)
        return streaming_problems(self, stages) if self.load == "streaming" else []
