"""Evaluating a model larger than memory (issue 28 item 5): ``model.load: offload`` and a streamed run's evaluate
stages read the model through accelerate's offloading — part of it in memory within ``memory_budget_gb``, the rest
read from disk per forward (``prunelab.stages.io.offload``).

Reference: the same folder loaded whole (``load_pruned``: vanilla ``from_pretrained`` for uniform folders, the
per-layer rebuild otherwise) and evaluated by the same perplexity code. Tolerance: the offloaded forward runs the same
float32 operations on the same tensors in the same order — measured difference on the dev CPU: exactly 0 (logits and
perplexity); the bound (1e-6 relative) leaves room for another CPU's kernels choosing differently per call.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import prunelab
from prunelab.api import load_recipe
from prunelab.recipe import RecipeError
from prunelab.stages.evaluation.perplexity import windowed_perplexity
from prunelab.stages.io.config import ModelConfig, TextSource
from prunelab.stages.io.loader import load_pruned
from prunelab.stages.io.models import load_model
from prunelab.stages.io.offload import offloaded_model
from prunelab.stages.io.text import tokenized_source
from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "tests" / "data" / "tiny_corpus.txt")
PPL = {"tiny": {"source": {"path": CORPUS}, "seq_len": 32, "max_tokens": 256, "batch_size": 2}}
RTOL = 1e-6


def _folder(root: Path, tie: bool) -> Path:
    folder = root / f"tiny-{'tied' if tie else 'untied'}"
    tiny_llama(num_layers=5, heads=4, kv_heads=2, tie=tie, seed=3).save_pretrained(folder, max_shard_size="150KB")
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dense folders (untied, tied), and the streamed run of ``_streamed`` on the untied one: its export has per-layer
    widths."""
    root = tmp_path_factory.mktemp("offload")
    out = {"untied": _folder(root, False), "tied": _folder(root, True)}
    prunelab.run(_streamed(out["untied"], "one-run"), output_dir=root / "runs")
    out["run"] = root / "runs" / "one-run"
    out["per-layer"] = out["run"] / "model"
    assert "prunelab_layer_shapes" in json.loads((out["per-layer"] / "config.json").read_text())
    return out


def _streamed(source: Path, name: str) -> dict[str, Any]:
    """A streamed FLAP run (global allocation: per-layer widths) with evaluate stages before the prune and after the
    export."""
    stages: dict[str, Any] = {"dense": {"type": "evaluate", "perplexity": PPL}}
    stages |= {
        "calibrate": {"type": "calibrate", "source": {"path": CORPUS}, "num_samples": 4, "seq_len": 32,
                      "pipeline": {"type": "sequential"}},
        "score": {"type": "score", "units": "width", "criteria": ["flap"]},
        "prune": {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.2, "allocation": "global",
                  "compensation": "optimal"},
        "export": {"type": "export", "shard_mb": 0.2}}
    stages["pruned"] = {"type": "evaluate", "perplexity": PPL}
    return {"name": name, "model": {"source": str(source), "load": "streaming", "memory_budget_gb": _budget(source)},
            "stages": stages}


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _budget(folder: Path, share: float = 0.35) -> float:
    """A share of the folder's weights, in GB: the embedding and room for one layer, most blocks on disk."""
    return share * _size(folder) / 2**30


def _ppl(model: torch.nn.Module) -> float:
    ids = tokenized_source(byte_tokenizer(), TextSource(path=CORPUS))
    return windowed_perplexity(model, ids, 32, 256, 2, progress=False)["ppl"]


@pytest.mark.parametrize("kind", ["untied", "tied", "per-layer"])
def test_offloaded_perplexity_equals_resident(folders: dict[str, Path], kind: str) -> None:
    folder = folders[kind]
    want = _ppl(load_pruned(folder))
    model = offloaded_model(folder, _budget(folder))
    placement = model.prunelab_offload
    assert placement["disk_bytes"] > placement["memory_bytes"] > 0  # most of it really is on disk
    assert any(p.is_meta for p in model.parameters())
    got = _ppl(model)
    assert got == pytest.approx(want, rel=RTOL)


def test_budget_sends_weights_to_disk(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = folders["untied"]
    budget = _budget(folder)
    model = offloaded_model(folder, budget, offload_dir=tmp_path / "off")
    placement = model.prunelab_offload
    assert placement["memory_bytes"] <= budget * 2**30
    copy = Path(placement["disk_read_from"])
    assert copy.parent == tmp_path / "off"
    dat = sorted(p.stem for p in copy.glob("*.dat"))
    assert "index.json" in {p.name for p in copy.iterdir()}
    assert any(".layers.4." in d for d in dat) and not any("embed_tokens" in d for d in dat)
    assert placement["disk_modules"] and all(
        p.is_meta for n, p in model.named_parameters() if n.startswith("model.layers.4."))
    assert sum((copy / f"{d}.dat").stat().st_size for d in dat) == placement["disk_bytes"]
    ppl = _ppl(model)
    assert ppl == pytest.approx(_ppl(load_pruned(folder)), rel=RTOL)  # read back from the copy
    del model
    gc.collect()
    assert not copy.exists()  # the copy goes with the model
    whole = offloaded_model(folder, 4.0)  # a budget that holds everything: nothing on disk
    assert whole.prunelab_offload["disk_bytes"] == 0 and not any(p.is_meta for p in whole.parameters())


def test_streamed_run_evaluates_source_and_export(folders: dict[str, Path], tmp_path: Path) -> None:
    """One run: evaluate the source, prune, export, evaluate the export — both through the offloaded load, each equal
    to a resident evaluation of that folder (``load_pruned``, and a resident run's ``load_model``, which before this
    change refused per-layer widths: transformers' size mismatch); a ``load: offload`` run of the export agrees."""
    source, run, exported = folders["untied"], folders["run"], folders["per-layer"]
    metrics = json.loads((run / "metrics.json").read_text())
    dense, pruned = metrics["eval"]["dense"]["tiny"]["ppl"], metrics["eval"]["pruned"]["tiny"]["ppl"]
    assert dense == pytest.approx(_ppl(load_pruned(source)), rel=RTOL)
    assert pruned == pytest.approx(_ppl(load_pruned(exported)), rel=RTOL)
    resident = load_model(ModelConfig(source=str(exported)))[0]  # a resident run's load builds per-layer widths too
    assert _ppl(resident) == pytest.approx(pruned, rel=RTOL)
    assert pruned != pytest.approx(dense, rel=1e-3)
    assert metrics["model"]["params_after"] < metrics["model"]["params_before"]
    for key in ("dense", "pruned"):  # each was offloaded, not loaded whole
        done = json.loads(next(run.glob(f"*-{key}/done.json")).read_text())
        assert done["outputs"]["offload"]["disk_bytes"] > done["outputs"]["offload"]["memory_bytes"] > 0
    again = prunelab.run({"name": "offload-run", "model": {"source": str(exported), "load": "offload",
                                                            "memory_budget_gb": _budget(exported)},
                          "stages": {"e": {"type": "evaluate", "label": "pruned", "perplexity": PPL}}},
                         output_dir=tmp_path)
    assert again["eval"]["pruned"]["tiny"]["ppl"] == pytest.approx(pruned, rel=RTOL)


def _problems(recipe: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    return str(err.value)


def test_bad_settings_name_the_field(folders: dict[str, Path]) -> None:
    source = folders["untied"]
    evaluate = {"type": "evaluate", "perplexity": PPL}
    offload = {"name": "x", "model": {"source": str(source), "load": "offload", "memory_budget_gb": 0.001},
               "stages": {"e": evaluate}}
    load_recipe(offload)  # fine as it is
    prune = json.loads(json.dumps(offload))
    prune["stages"]["p"] = {"type": "prune", "criterion": "magnitude", "ratio": 0.2}
    assert "stages.p: a prune stage changes or reads every weight" in _problems(prune)
    speed = json.loads(json.dumps(offload))
    speed["stages"]["e"]["speed"] = {}
    assert "stages.e.speed: with model.load: offload" in _problems(speed)
    cuda = json.loads(json.dumps(offload))
    cuda["model"]["device"] = "cuda"
    assert "model.device: 'cuda'" in _problems(cuda)
    tiny = json.loads(json.dumps(offload))
    tiny["model"]["source"] = "tiny-random-llama"
    assert "model.load: offload needs a folder on disk" in _problems(tiny)
    resident = {"name": "x", "model": {"source": str(source), "memory_budget_gb": 1}, "stages": {"e": evaluate}}
    assert "memory_budget_gb: only read with load: offload or streaming" in _problems(resident)
    zero = json.loads(json.dumps(offload))
    zero["model"]["memory_budget_gb"] = 0
    assert "memory_budget_gb" in _problems(zero)
    between = _streamed(source, "between")
    between["stages"] = {k: v for k, v in between["stages"].items() if k != "pruned"}
    stages = list(between["stages"].items())
    between["stages"] = dict(stages[:-1] + [("mid", evaluate)] + stages[-1:])  # after prune, before export
    assert "stages.mid: with model.load: streaming the pruned model exists only once the export" in _problems(between)
    load_recipe(_streamed(source, "ok"))  # before the prune and after the export: fine
    with pytest.raises(ValueError, match="model.memory_budget_gb: .* does not hold the embedding"):
        offloaded_model(source, 1e-6)  # caught before any weight is read
