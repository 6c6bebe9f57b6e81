"""prunelab's Python API: :func:`run` a recipe, :func:`prune` a model already in memory, :func:`load` an export.

The API is a thin door onto the same code the CLI runs — no second orchestrator:

- :func:`run` validates and preflights a recipe exactly as ``prunelab run`` does, then calls the runner;
- :func:`prune` builds a one-off recipe (``calibrate → score → prune``) from its keyword arguments, validates it
  with the recipe schema (so a bad setting gets the same message as in a YAML file) and calls those stages' own
  ``run`` functions on a :class:`~pipeline.context.RunContext` holding YOUR model; the model is pruned in place;
- :func:`load` reads any export (per-layer widths included) or a run directory.

Examples (runnable; ``docs/api.md`` holds more, executed by ``tests/test_api.py``)::

    import prunelab
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

    model, tok = tiny_llama(num_layers=6), byte_tokenizer()
    text = open("tests/data/tiny_corpus.txt").read()
    result = prunelab.prune(model, tok, calibration=text, criterion="block_influence", num_blocks=2,
                            num_samples=4, seq_len=64)
    print(result.plan.describe())          # which blocks went, parameters before → after
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import OmegaConf

from prunelab.context import RunContext
from prunelab.preflight import preflight
from prunelab.recipe import RecipeError, load_raw, load_recipe as load_file, validate
from prunelab.registry import load_stages
from prunelab.runner import execute
from prunelab.shipped import ShippedRecipeError, find_recipe, recipe_text
from prunelab.stages.io.config import ModelConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prunelab.recipe import RecipeBase
    from prunelab.stages.surgery.plan import DepthPlan, HiddenPlan, WidthPlan

__all__ = ["PruneResult", "load", "load_recipe", "prune", "run"]


# ----------------------------------------------------------------------------- recipes
def _overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    """``["a.b=1"]`` or ``{"a.b": 1}`` → OmegaConf dot-list strings (values written as YAML flow scalars)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        raise TypeError(f"overrides={overrides!r}: pass a list of 'key.path=value' strings or a dict, not one string")
    return list(overrides)


def load_recipe(recipe: str | Path | Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] | None = None,
                output_dir: str | Path | None = None) -> RecipeBase:
    """A validated recipe from a YAML path, a shipped recipe's name (``debug``, ``smollm2/flap-20``) or a dict,
    with ``overrides`` merged over it; raises :class:`pipeline.recipe.RecipeError` naming every bad field."""
    dots = _overrides(overrides) + ([f"output_dir={output_dir}"] if output_dir is not None else [])
    if isinstance(recipe, Mapping):
        with tempfile.TemporaryDirectory() as tmp:  # one merge path for dicts and files: the file's
            path = Path(tmp) / "recipe.yaml"
            path.write_text(yaml.safe_dump(OmegaConf.to_container(OmegaConf.create(dict(recipe))), sort_keys=False))
            return validate(load_raw(path, dots))
    with recipe_file(str(recipe)) as path:
        try:
            return load_file(path, dots)
        except FileNotFoundError:
            raise RecipeError([f"{recipe}: no such recipe file"]) from None


@contextlib.contextmanager
def recipe_file(recipe: str) -> Iterator[Path]:
    """A path to read the recipe from: the file itself, or a shipped recipe (by name) written to a temporary file
    with its data paths made absolute where the working directory does not hold them."""
    if Path(recipe).is_file():
        yield Path(recipe)
        return
    try:
        shipped = find_recipe(recipe)
    except ShippedRecipeError as exc:
        raise RecipeError([str(exc)]) from None
    text, replaced = recipe_text(shipped)
    if not replaced:
        yield shipped.path
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / shipped.path.name
        path.write_text(text, encoding="utf-8")
        yield path


def run(recipe: str | Path | Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] | None = None, *,
        output_dir: str | Path | None = None, resume: bool = False, force: bool = False,
        progress: bool = False) -> dict[str, Any]:
    """Run a recipe end to end — what ``prunelab run RECIPE`` does — and return its ``metrics.json`` as a dict.

    ``recipe`` is a YAML path, a shipped recipe's name or a dict; ``overrides`` are dot paths
    (``["stages.prune.num_blocks=3"]`` or ``{"stages.prune.num_blocks": 3}``). The run directory is
    ``<output_dir>/<name>``: ``resume`` continues it, ``force`` starts it over.

    >>> metrics = prunelab.run("debug", output_dir=tmp, overrides={"stages.prune.num_blocks": 1})  # doctest: +SKIP
    >>> metrics["model"]["layers_after"]  # doctest: +SKIP
    5
    """
    if resume and force:
        raise ValueError("resume=True and force=True contradict each other; choose one")
    parsed = load_recipe(recipe, overrides, output_dir)
    preflight(parsed, probe_hub=True)  # a hub id or dataset not cached: refused offline in ~1 s, as the CLI does
    metrics = execute(parsed, parsed.run_dir, resume=resume, force=force, progress=progress)
    assert metrics is not None, "prunelab.run returns metrics on the main process only; call it from one process"
    return metrics


# ----------------------------------------------------------------------------- prune a model in memory
@dataclass
class PruneResult:
    """What :func:`prune` returns: the model (the same object, pruned in place), its plan, the calibration windows
    it scored on and every criterion's scores (as ``scores.json`` of a run)."""

    model: nn.Module
    plan: DepthPlan | WidthPlan | HiddenPlan
    calibration: torch.Tensor
    scores: dict[str, Any]

    def __iter__(self) -> Iterator[Any]:  # ``model, plan = prunelab.prune(...)``
        return iter((self.model, self.plan))


def _calibration_source(calibration: Any, folder: Path, text_field: str) -> dict[str, Any] | None:
    """The calibrate stage's ``source`` for ``calibration``, or None for token ids (used as they are).

    Text and `datasets.Dataset` rows are written to a file in ``folder`` and read back by the calibrate stage's own
    code, so the windows are the ones a recipe naming that file would draw."""
    if isinstance(calibration, str):
        (folder / "calibration.txt").write_text(calibration, encoding="utf-8")
        return {"path": str(folder / "calibration.txt")}
    if isinstance(calibration, Mapping):
        return dict(calibration)
    if hasattr(calibration, "column_names") and hasattr(calibration, "__getitem__"):  # a datasets.Dataset
        if text_field not in calibration.column_names:
            raise ValueError(f"calibration: the dataset has no column {text_field!r} (columns: "
                             f"{', '.join(calibration.column_names)}); pass text_field= naming the text column")
        with (folder / "calibration.jsonl").open("w", encoding="utf-8") as f:
            for row in calibration[text_field]:
                f.write(json.dumps({text_field: row}) + "\n")
        return {"path": str(folder / "calibration.jsonl"), "text_field": text_field}
    if isinstance(calibration, Sequence) and calibration and all(isinstance(x, str) for x in calibration):
        return _calibration_source("\n\n".join(calibration), folder, text_field)
    return None


def _token_ids(calibration: Any, vocab_size: int) -> torch.Tensor:
    import torch  # lazy: torch-free

    if not isinstance(calibration, torch.Tensor):
        raise TypeError(f"calibration: got {type(calibration).__name__}; pass text (str or list of str), a "
                        "datasets.Dataset, a calibration source dict ({'path': ...}) or a LongTensor of token ids")
    if calibration.dtype not in (torch.int64, torch.int32) or calibration.dim() != 2:
        raise ValueError(f"calibration: token ids must be a 2-D integer tensor [num_samples, seq_len]; got "
                         f"{calibration.dim()}-D {calibration.dtype}")
    if calibration.numel() and (int(calibration.min()) < 0 or int(calibration.max()) >= vocab_size):
        raise ValueError(f"calibration: token ids must lie in [0, {vocab_size}) (the model's vocab_size)")
    return calibration.long().cpu()


def prune(model: nn.Module, tokenizer: Any = None, *, calibration: Any, criterion: str, units: str = "blocks",
          num_samples: int = 32, seq_len: int = 512, seed: int = 0, score: Mapping[str, Any] | None = None,
          sampling: str = "windows", text_field: str = "text", progress: bool = False,
          **settings: Any) -> PruneResult:
    """Prune ``model`` (in place) as a recipe's ``calibrate → score → prune`` stages would, and return it with its plan.

    - ``calibration``: text (a string or a list of strings), a ``datasets.Dataset`` (its ``text_field`` column), a
      calibration source as in a recipe (``{"path": "valid.txt"}``, ``{"dataset": "wikitext", ...}``), or a
      LongTensor ``[num_samples, seq_len]`` of token ids (used as they are; ``num_samples``/``seq_len`` ignored).
    - ``criterion``, ``units`` and ``**settings`` are the prune stage's settings, as in a recipe
      (``num_blocks=2``, or ``units="width", ratio=0.2, allocation="global", compensation="bias"``);
    - ``score`` adds settings of the score stage (``{"batch_size": 4, "settings": {...}}``).

    A setting the recipe schema rejects raises :class:`pipeline.recipe.RecipeError` before any work, naming the
    field as ``stages.prune.<field>``. The tokenizer is needed for text calibration only.

    >>> model, plan = prunelab.prune(model, tok, calibration=text, criterion="ppl", num_blocks=2)  # doctest: +SKIP
    """
    import torch  # lazy: torch-free
    from accelerate import PartialState  # lazy: torch-free

    with tempfile.TemporaryDirectory(prefix="prunelab-prune-") as tmp:
        folder = Path(tmp)
        source = _calibration_source(calibration, folder, text_field)
        ids = None if source is not None else _token_ids(calibration, model.config.vocab_size)
        if ids is not None:
            num_samples, seq_len = ids.shape
            source = {"path": str(folder / "token-ids.txt")}  # never read: the ids go straight to the score stage
        score_units = "blocks" if units == "blocks" else "width"
        raw = {
            "name": "in-memory", "seed": seed, "output_dir": str(folder), "model": {"source": "in-memory"},
            "stages": {
                "calibrate": {"type": "calibrate", "source": source, "num_samples": num_samples, "seq_len": seq_len,
                              "sampling": sampling},
                "score": {"type": "score", "units": score_units, **dict(score or {})},
                "prune": {"type": "prune", "units": units, "criterion": criterion, **settings},
            },
        }
        recipe = validate(raw)
        if tokenizer is None and ids is None:
            raise ValueError("tokenizer: text calibration needs the model's tokenizer; pass it, or pass token ids")
        PartialState()  # the stages log through accelerate's logger, which needs its state (one process here)
        ctx = RunContext(recipe=recipe, run_dir=recipe.run_dir, accelerator=None, progress=progress)
        ctx.model, ctx.tokenizer = model, tokenizer
        ctx.model_info.update(source=type(model).__name__, model_type=model.config.model_type,
                              params_before=ctx.adapter.total_params(), layers_before=ctx.adapter.num_blocks)
        specs = load_stages()
        with torch.random.fork_rng(devices=[]):
            for index, (key, cfg) in enumerate(recipe.stages.items(), start=2):
                ctx.stage_key, ctx.stage_dir = key, folder / f"{index:02d}-{key}"
                ctx.stage_dir.mkdir(parents=True)
                from accelerate.utils import set_seed  # lazy: torch-free

                set_seed(seed)  # as the runner does before every stage
                if key == "calibrate" and ids is not None:
                    ctx.calibration = ids
                    continue
                specs.get(cfg.type).run(ctx, cfg)
    assert ctx.plan is not None
    model.eval()
    return PruneResult(model=model, plan=ctx.plan, calibration=ctx.calibration, scores=dict(ctx.scores))


# ----------------------------------------------------------------------------- load an export
def load(path: str | Path, *, dtype: Any = None, device: str = "cpu", tokenizer: bool = False) -> Any:
    """Load what prunelab exported: a model folder (per-layer widths included, through
    :func:`prunelab.stages.io.loader.load_pruned`), a run directory (its ``model/``), or a ``.gguf`` file (dequantized by
    transformers). With ``tokenizer=True`` returns ``(model, tokenizer)``.

    >>> model = prunelab.load("runs/debug")  # doctest: +SKIP
    """
    import torch  # lazy: torch-free

    path = Path(path).expanduser()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"  # a run directory
    if path.is_file() and path.suffix == ".gguf":
        from prunelab.stages.io.models import load_model  # lazy: torch-free

        name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", None: "float32"}[dtype]
        model, tok = load_model(ModelConfig(source=str(path), dtype=name, device=device))
        return (model, tok) if tokenizer else model
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a prunelab export (no config.json) nor a run directory with model/ "
                                "inside, nor a .gguf file")
    from prunelab.stages.io.loader import load_pruned  # lazy: torch-free

    model = load_pruned(path, dtype=dtype, device=device)
    if not tokenizer:
        return model
    from transformers import AutoTokenizer  # lazy: torch-free

    return model, AutoTokenizer.from_pretrained(path)

