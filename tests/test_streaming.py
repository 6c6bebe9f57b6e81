"""``model.load: streaming`` (issue 28 item 5): a run that never holds the model — a meta skeleton, blocks read from the
safetensors shards, the pruned model written block by block — must export the same model as a resident run.

Reference: the same recipe with ``load: resident`` and ``pipeline: full``. Tolerance: float32 weights; the streamed
run's statistics come from the sequential pipeline (per block, the same products) and its optimal compensation from
the same float64 arithmetic with fewer temporaries — measured difference on the dev CPU: exactly 0 for BI, FLAP +
optimal and Taylor; the bound below (1e-5 relative) leaves room for another CPU's BLAS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import prunelab
from prunelab.api import load_recipe
from prunelab.recipe import RecipeError
from prunelab.stages.calibration.streamed import SpilledTensors, layers_resident, load_streaming
from prunelab.stages.io.streaming import ShardWriter
from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "tests" / "data" / "tiny_corpus.txt")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untied GQA Llama saved in several safetensors shards, with its tokenizer."""
    folder = tmp_path_factory.mktemp("sharded") / "model"
    tiny_llama(num_layers=5, heads=4, kv_heads=2, tie=False, seed=3).save_pretrained(folder, max_shard_size="150KB")
    byte_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _recipe(source: Path, load: str, method: str, pipeline: str = "sequential") -> dict[str, Any]:
    if method == "bi":
        score = {"type": "score", "criteria": ["block_influence"]}
        prune = {"type": "prune", "criterion": "block_influence", "num_blocks": 2}
    elif method == "flap":  # global allocation: per-layer widths, written with prunelab_layer_shapes
        score = {"type": "score", "units": "width", "criteria": ["flap"]}
        prune = {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.2, "allocation": "global",
                 "compensation": "optimal"}
    elif method == "flap-bias":  # uniform widths + FLAP's bias: biases switched on in every layer
        score = {"type": "score", "units": "width", "criteria": ["flap"]}
        prune = {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.2, "compensation": "bias"}
    else:
        score = {"type": "score", "units": "width", "criteria": ["taylor"]}
        prune = {"type": "prune", "units": "width", "criterion": "taylor", "ratio": 0.2}
    return {"name": f"{method}-{load}", "model": {"source": str(source), "load": load}, "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": CORPUS}, "num_samples": 4, "seq_len": 32,
                      "pipeline": {"type": pipeline}},
        "score": score, "prune": prune, "export": {"type": "export", "shard_mb": 0.2}}}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _config(folder: Path) -> dict[str, Any]:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("transformers_version", None)
    return cfg


@pytest.mark.parametrize("method", ["bi", "flap", "flap-bias", "taylor"])
def test_streamed_export_equals_resident(sharded: Path, tmp_path: Path, method: str) -> None:
    resident = prunelab.run(_recipe(sharded, "resident", method, "full"), output_dir=tmp_path)
    streamed = prunelab.run(_recipe(sharded, "streaming", method), output_dir=tmp_path)
    assert streamed["model"]["params_after"] == resident["model"]["params_after"] < resident["model"]["params_before"]
    a, b = tmp_path / f"{method}-resident" / "model", tmp_path / f"{method}-streaming" / "model"
    assert _config(b) == _config(a)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(tb[name], ta[name], rtol=1e-5, atol=1e-6, msg=name)
    index = json.loads((b / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(tb)
    if method in ("flap", "flap-bias"):  # the compensation is in what was compared
        assert any(n.endswith(("o_proj.bias", "down_proj.bias")) for n in tb)
    assert not list(tmp_path.glob(f"{method}-streaming/.model.tmp-*"))  # written in a temporary folder, renamed
    # reload: uniform results in vanilla transformers, per-layer widths in the prunelab loader; the logits of the
    # resident run's export
    from transformers import AutoModelForCausalLM

    from prunelab.stages.io.loader import load_pruned

    per_layer = "prunelab_layer_shapes" in _config(b)
    assert per_layer == (method == "flap")
    load = load_pruned if per_layer else AutoModelForCausalLM.from_pretrained
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        got, want = load(b).eval()(ids).logits, load(a).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _problems(recipe: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    return str(err.value)


def test_refused_at_validation(sharded: Path, tmp_path: Path) -> None:
    base = _recipe(sharded, "streaming", "flap")
    full = json.loads(json.dumps(base))
    full["stages"]["calibrate"]["pipeline"] = {"type": "full"}
    assert "needs pipeline: {type: sequential}" in _problems(full)
    evaluate = json.loads(json.dumps(base))  # between prune and export (before or after both: tests/test_offload.py)
    stages = list(evaluate["stages"].items())
    evaluate["stages"] = dict(stages[:-1] + [("eval", {"type": "evaluate", "perplexity": {
        "tiny": {"source": {"path": CORPUS}, "seq_len": 32, "max_tokens": 256}}})] + stages[-1:])
    assert "stages.eval: with model.load: streaming the pruned model exists only once" in _problems(evaluate)
    recover = json.loads(json.dumps(base))
    recover["stages"]["recover"] = {"type": "recover", "method": "lora", "data": {"source": {"path": CORPUS}}}
    assert "stages.recover: a recover stage needs the whole model resident" in _problems(recover)
    gguf = json.loads(json.dumps(base))
    gguf["stages"]["export"]["formats"] = ["hf", "gguf"]
    assert "writes the hf folder only" in _problems(gguf)
    alpha = json.loads(json.dumps(base))
    alpha["stages"]["prune"]["allocation"] = {"type": "alpha"}
    assert "allocation: alpha reads the spectra" in _problems(alpha)
    tiny = json.loads(json.dumps(base))
    tiny["model"]["source"] = "tiny-random-llama"
    assert "save it with save_pretrained" in _problems(tiny)
    hub = json.loads(json.dumps(base))
    hub["model"]["source"] = "nobody-here/not-a-cached-model"
    assert "not in the local Hugging Face cache" in _problems(hub)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((sharded / "config.json").read_text())
    nofiles = json.loads(json.dumps(base))
    nofiles["model"]["source"] = str(bare)
    assert "holds no *.safetensors files" in _problems(nofiles)
    load_recipe(base)  # the recipe itself is fine


def test_hidden_units_refused(sharded: Path) -> None:
    recipe = _recipe(sharded, "streaming", "taylor")
    recipe["stages"]["prune"] = {"type": "prune", "units": "hidden", "criterion": "taylor", "ratio": 0.1}
    problems = _problems(recipe)
    assert "units: hidden touches every tensor" in problems


def test_layers_resident_materializes_one_layer_at_a_time(sharded: Path) -> None:
    from prunelab.stages.arch import adapter_for
    from prunelab.stages.io.config import ModelConfig

    model, _ = load_streaming(ModelConfig(source=str(sharded), load="streaming"))
    ad = adapter_for(model)
    resident = []
    with layers_resident(model):
        for i, layer in enumerate(ad.layers):
            resident.append([j for j, other in enumerate(ad.layers._modules.values())
                             if not next(other.parameters()).is_meta])
            assert not next(layer.parameters()).is_meta
    assert resident == [[i] for i in range(ad.num_blocks)]
    assert all(p.is_meta for p in model.parameters())  # all freed again, and indexing never loads
    assert next(ad.layers[0].parameters()).is_meta


def test_shard_writer_roundtrip(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(4, 4)}
    spec = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    writer = ShardWriter(tmp_path, spec, max_bytes=64)
    for k in ("c", "a", "b"):  # any order: each tensor has its place already
        writer.write(k, tensors[k])
    assert writer.close()["shards"] == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    got = {k: load_file(tmp_path / f)[k] for k, f in index["weight_map"].items()}
    for k, v in tensors.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        ShardWriter(tmp_path / ".", {"a": ((2,), torch.float32)}, 64).write("a", torch.zeros(3))
    missing = ShardWriter(tmp_path, spec, 1 << 20)
    missing.write("a", tensors["a"])
    with pytest.raises(RuntimeError, match="never written"):
        missing.close()


def test_spilled_tensors_keep_one_block(tmp_path: Path) -> None:
    table = SpilledTensors(tmp_path, lambda name: name.split(".")[0])
    table["b1.w"] = torch.ones(3)
    table["b1.w"] = table["b1.w"] + 1  # the fold's read-modify-write inside one block
    table["b0.w"] = torch.full((2,), 5.0)  # another block: b1 goes to disk
    assert set(table.hot) == {"b0.w"} and "b1.w" in table and len(table) == 2
    torch.testing.assert_close(table["b1.w"], torch.full((3,), 2.0))
    with pytest.raises(KeyError, match="already spilled"):
        table["b1.w"] = torch.zeros(3)


@pytest.mark.parametrize("with_bias", [True, False])
def test_lean_optimal_equals_optimal_layer(with_bias: bool) -> None:
    """The streamed export's OBS update (Cholesky, only the removed rows of H⁻¹, in-place sums) is the resident
    run's ``optimal_layer`` up to float64 rounding."""
    from prunelab.stages.surgery.streamed import GramSums, lean_optimal
    from prunelab.stages.surgery.compensation import optimal_layer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 24, generator=g) + torch.linspace(-1, 1, 24)
    weight, bias = torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
    sums = GramSums()
    for batch in x:
        sums.add(batch)
    flat = x.reshape(-1, 24).double()
    removed = [1, 5, 6, 17, 23]
    want_w, want_b = optimal_layer(weight, bias, flat.T @ flat, flat.sum(0), flat.shape[0], removed, 0.01, with_bias)
    got_w, got_b = lean_optimal(weight, bias, sums, removed, 0.01, with_bias)
    torch.testing.assert_close(got_w, want_w, rtol=1e-9, atol=1e-10)
    if with_bias:
        torch.testing.assert_close(got_b, want_b, rtol=1e-9, atol=1e-10)
    assert sums.h is None  # the buffer was handed over, not copied
