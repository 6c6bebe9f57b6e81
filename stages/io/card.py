"""Model cards the Hub can read: the exported model's README.md and the LoRA adapter's.

The front matter is what the Hub indexes — ``base_model`` (the model pruned, when it is a hub id), the base model's
``license`` (read from its own card or config; left out with a note in the text when neither says it),
``tags``, ``pipeline_tag: text-generation`` and the results as ``model-index`` metrics (through
``huggingface_hub.ModelCardData`` / ``EvalResult``, so the YAML has the Hub's schema). The text is the plan in
one paragraph, the before/after table, every evaluation with its protocol, and how to load the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from prunelab.stages.evaluation.describe import describe_result
from prunelab.stages.io.sources import alias_dirs, classify

TAGS = ["prunelab", "pruned", "structured-pruning"]
# Hub ids of the built-in aliases (stages.io.sources.ALIASES): the model the alias's GGUF was converted from.
ALIAS_BASE = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def _front_matter_license(readme: Path) -> str | None:
    """``license:`` from a model card's YAML front matter."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    return str(lic) if lic else None


def source_folder(source: str, revision: str | None = None) -> Path | None:
    """The local folder holding the source model's files (its card and config), without the network."""
    try:
        src = classify(source, None)
    except (OSError, ValueError):
        return None
    if src.kind == "alias":
        return alias_dirs(src.path)[1]
    if src.kind in ("local", "gguf"):
        return Path(src.path)
    if src.kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache  # lazy: startup

            hit = try_to_load_from_cache(src.path, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 (an odd cache layout means: not cached)
            return None
        return Path(hit).parent if isinstance(hit, str) else None
    return None


def base_model_of(source: str) -> str | None:
    """The hub id to put in ``base_model``: the source when it is a hub id, an alias's original; None for a local
    folder (its id is unknown) or a built-in tiny model."""
    if source in ALIAS_BASE:
        return ALIAS_BASE[source]
    try:
        return source if classify(source, None).kind == "hub" else None
    except (OSError, ValueError):
        return None


def base_license(source: str, revision: str | None = None) -> str | None:
    """The base model's license from its card's front matter (or a ``license`` in its config.json); None if unknown."""
    folder = source_folder(source, revision)
    if folder is None:
        return None
    found = _front_matter_license(folder / "README.md")
    if found:
        return found
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return str(cfg["license"]) if isinstance(cfg, dict) and cfg.get("license") else None


def eval_results(evals: dict[str, dict[str, Any]], label: str, model_name: str) -> list[Any]:
    """``EvalResult`` entries (model-index) for the results of the model as exported (``label``)."""
    from huggingface_hub import EvalResult  # lazy: startup

    out = []
    for name, r in evals.get(label, {}).items():
        if "ppl" in r:
            out.append(EvalResult(task_type="text-generation", task_name="Language modelling", dataset_type=name,
                                  dataset_name=name, metric_type="perplexity", metric_name="perplexity",
                                  metric_value=round(float(r["ppl"]), 4),
                                  metric_config=f"seq_len {r.get('seq_len')}, {r.get('tokens')} tokens"))
        elif "lm_eval_version" in r:
            for metric in r.get("metrics") or [k for k in ("acc", "acc_norm") if k in r]:
                if isinstance(r.get(metric), float):
                    out.append(EvalResult(task_type="text-generation", task_name=f"zero-shot {name}", dataset_type=name,
                                          dataset_name=name, metric_type=metric.split(",")[0], metric_name=metric,
                                          metric_value=round(r[metric], 4),
                                          metric_config=f"{r.get('num_fewshot', 0)}-shot, {r.get('samples')} samples, "
                                                        f"lm-eval {r.get('lm_eval_version')}"))
    return out


def card_data(source: str, revision: str | None, tags: list[str], evals: dict[str, dict[str, Any]], label: str,
              model_name: str, library: str = "transformers") -> tuple[Any, list[str]]:
    """The card's ``ModelCardData`` and the notes the text must carry (e.g. why ``license`` is missing)."""
    from huggingface_hub import ModelCardData  # lazy: startup

    notes: list[str] = []
    base, lic = base_model_of(source), base_license(source, revision)
    if lic is None:
        notes.append(f"License: not stated here — the base model's card and config (`{source}`) name none that "
                     "prunelab could read; a pruned model inherits its base model's license, check it before use.")
    results = eval_results(evals, label, model_name)
    data = ModelCardData(library_name=library, base_model=base, license=lic, tags=tags, pipeline_tag="text-generation",
                         model_name=model_name if results else None, eval_results=results or None)
    return data, notes


def _front(data: Any) -> list[str]:
    return ["---", data.to_yaml(), "---", ""]


def model_card(ctx: Any) -> str:
    """README.md for the exported model (``ctx``: the run's ``pipeline.context.RunContext``; the library does not
    import the frame): front matter for the Hub, the plan in one paragraph, the before/after table, the
    evaluations with their protocols, and how to load it."""
    info, plan, recipe = ctx.model_info, ctx.plan, ctx.recipe
    kind = getattr(plan, "kind", None)
    tags = TAGS + ([f"{kind}-pruning"] if kind else []) + (["lora-recovered"] if ctx.state == "recovered" else [])
    # model-index: the results of the model as exported (its state: pruned or recovered), not the dense baseline
    data, notes = card_data(recipe.model.source, recipe.model.revision, tags, ctx.evals, ctx.state, recipe.name)
    source = info.get("source", recipe.model.source)
    lines = _front(data) + [
        f"# {recipe.name}", "",
        f"Pruned with prunelab (see the README.md of the prunelab repository) from `{source}`"
        + (f" ([{data.base_model}](https://huggingface.co/{data.base_model}))" if data.base_model else "") + ".", "",
    ]
    if plan is not None:  # the typed plan describes itself (stages.surgery.plan), as in report.md and the CLI summary
        recovered = (" Then recovered by training (" + ", ".join(
            f"{r.get('steps')} steps, loss {r.get('first_loss'):.3f} → {r.get('final_loss'):.3f}"
            for r in ctx.recover_info.values() if isinstance(r.get("first_loss"), float) and isinstance(r.get("final_loss"), float))
            + ").") if ctx.recover_info else ""
        lines += ["## Plan", "", plan.describe() + recovered, ""]
    lines += [
        "| | before | after |", "|---|---|---|",
        f"| parameters | {info.get('params_before', 0):,} | {info.get('params_after', info.get('params_before', 0)):,} |",
        f"| decoder blocks | {info.get('layers_before')} | {info.get('layers_after', info.get('layers_before'))} |", "",
    ]
    if plan is not None and plan.details():
        lines += [*plan.details(), ""]
    if ctx.evals:
        lines += ["## Evaluation", "", "| model | what | result | protocol |", "|---|---|---|---|"]
        for lab, results in ctx.evals.items():
            for name, r in results.items():
                lines.append(f"| {lab} | {name} | {describe_result(r)} | {r.get('protocol', '')} |")
        lines.append("")
    if getattr(ctx.model.config, "prunelab_layer_shapes", None):
        lines += [("Layer widths differ (adaptive width pruning): load with `import prunelab; model = "
                   "prunelab.load(path)` (`pip install prunelab`); plain transformers cannot build per-layer widths "
                   "yet."), ""]
    else:
        lines += ["Loads with plain `transformers`: `AutoModelForCausalLM.from_pretrained(path)` (no remote code).", ""]
    lines += [*notes, ""] if notes else []
    return "\n".join(lines)


def adapter_card(source: str, revision: str | None, method: str, info: dict[str, Any], settings: dict[str, Any],
                 recipe_name: str) -> str:
    """README.md for a saved LoRA/QLoRA adapter (replacing peft's empty template): what it adapts, how it was
    trained (method, steps, data, loss) and how to apply it."""
    data, notes = card_data(source, revision, [*TAGS, "lora", "peft", method], {}, "", recipe_name, library="peft")

    def get(group: str, key: str) -> Any:  # None where the group is not a mapping
        value = settings.get(group)
        return value.get(key) if isinstance(value, dict) else None

    first, final = info.get("first_loss"), info.get("final_loss")
    loss = (f"{first:.4f} → {final:.4f}" if isinstance(first, float) and isinstance(final, float) else "not recorded")
    lines = _front(data) + [
        f"# {recipe_name}: {method} adapter ({info.get('label', 'pruned')} model)", "",
        (f"A {method.upper()} adapter trained by prunelab to recover the accuracy of `{source}` after structured "
         "pruning. It applies to the PRUNED model (the run's `model/` before merging), not to the base model: its "
         "layer shapes are the pruned ones." if info.get("label", "pruned") != "control" else
         f"A {method.upper()} adapter trained by prunelab on the DENSE `{source}` with the same settings as the pruned "
         "model's (the control that tells recovery from plain fine-tuning); it applies to the dense model."), "",
        "| | |", "|---|---|",
        f"| base model | `{source}`" + (" (dense)" if info.get("label") == "control" else f" pruned by recipe `{recipe_name}`") + " |",
        f"| method | {method} (rank {get('lora', 'rank')}, alpha {get('lora', 'alpha')}) |",
        f"| steps | {info.get('steps')} (batch {get('loop', 'batch_size')}, {info.get('processes', 1)} processes) |",
        f"| data | {_source_text(get('data', 'source'))} |",
        f"| loss ({_loss_type(settings.get('loss'))}) | {loss} |",
        f"| tokens/s | {info.get('tokens_per_s')} |", "",
        "Apply it with peft: `PeftModel.from_pretrained(pruned_model, path).merge_and_unload()`; the run's exported "
        "`model/` already has it merged.", "",
    ]
    lines += [*notes, ""] if notes else []
    return "\n".join(lines)


def write_adapter_card(folder: Path, source: str, revision: str | None, method: str, info: dict[str, Any],
                       settings: dict[str, Any], recipe_name: str) -> None:
    """Overwrite peft's template README.md in a saved adapter folder (no-op when there is no adapter there)."""
    if not (folder / "adapter_config.json").is_file():
        return
    (folder / "README.md").write_text(adapter_card(source, revision, method, info, settings, recipe_name), encoding="utf-8")


def write_adapter_cards(stage_dir: Path, folder: str, recipe: Any, cfg: Any, infos: dict[str, dict[str, Any]]) -> None:
    """The recover stage's adapters: ``<stage>/<folder>`` (the pruned model's) and ``<stage>/control/<folder>``."""
    for label, info in infos.items():
        where = stage_dir / folder if label == "pruned" else stage_dir / label / folder
        name = recipe.name if label == "pruned" else f"{recipe.name} ({label}: the dense model)"
        write_adapter_card(where, recipe.model.source, recipe.model.revision, cfg.method, info,
                           cfg.model_dump(mode="json"), name)


def _source_text(source: Any) -> str:
    """A recovery data source as a recipe would name it: the file, or dataset:config:split (mixes and generated text
    as their settings)."""
    if isinstance(source, dict):
        if source.get("path"):
            return str(source["path"])
        if source.get("dataset"):
            return ":".join(str(source[k]) for k in ("dataset", "config", "split") if source.get(k))
        return ", ".join(f"{k}: {v}" for k, v in source.items() if v not in (None, "", [], {}))
    return str(source)


def _loss_type(loss: Any) -> str:
    """The recovery loss's name: ``ce`` dumps as the bare string (stages.recovery.config.LossSettings), others as a mapping."""
    return loss if isinstance(loss, str) else (loss or {}).get("type", "?") if isinstance(loss, dict) else "?"
