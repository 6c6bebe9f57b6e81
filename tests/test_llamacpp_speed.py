"""launch/llamacpp_speed.py (issue 25 item 6): the ideals are counted right from the GGUF tensors, and the script runs
dense and pruned tiny models interleaved in llama.cpp, f32 and q8_0, writing its table and JSON. No timing asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import prunelab.stages.io.gguf_export as G
from prunelab.stages.arch import adapter_for
from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
MISSING = G.llama_cpp_missing()
needs_llama = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def _script():
    spec = importlib.util.spec_from_file_location("llamacpp_speed", ROOT / "launch" / "llamacpp_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pruned(tie: bool = True) -> torch.nn.Module:
    model = tiny_llama(tie=tie)
    ad = adapter_for(model)
    for i, layer in enumerate(ad.layers):
        if i % 2:
            ad.resize_layer(layer, 2, 1, 64)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_tensor_stats_count_params_embedding_and_decode_bytes(tmp_path, tie):
    """All parameters = the torch model's; without the embedding = minus token_embd (and output when untied); a
    decode step reads every tensor but token_embd, plus the head in full — in f32 with a tied head, 4 bytes × all."""
    mod = _script()
    model = _pruned(tie)
    G.write_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=byte_tokenizer())
    s = mod.tensor_stats(tmp_path / "m.gguf")
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    assert s["params_all"] == n
    assert s["params_no_embedding"] == n - emb * (1 if tie else 2)
    assert s["decode_bytes"] == 4 * (n if tie else n - emb)
    assert s["architecture"] == "deci" and s["blocks"] == 6


@needs_llama
def test_script_end_to_end_on_tiny_models(tmp_path):
    """Dense and two pruned tiny GGUFs, f32 and q8_0 (llama.cpp's quantizer), one round: every model has positive
    tokens/s and ratios, the ideals are the parameter ratios, and the JSON and table are written."""
    mod = _script()
    dense = tiny_llama()
    G.write_gguf(dense, tmp_path / "dense.gguf", "f32", tokenizer=byte_tokenizer())
    G.write_gguf(_pruned(), tmp_path / "widths.gguf", "f32", tokenizer=byte_tokenizer())
    (tmp_path / "run").mkdir()
    G.write_gguf(tiny_llama(num_layers=4), tmp_path / "run" / "model.gguf", "f32", tokenizer=byte_tokenizer())
    out = tmp_path / "res" / "speed.json"
    mod.main([f"widths={tmp_path / 'widths.gguf'}", f"depth={tmp_path / 'run'}", "--dense", str(tmp_path / "dense.gguf"),
              "--work", str(tmp_path / "work"), "--out", str(out), "--threads", "1", "--batch", "32", "--rounds", "1",
              "--decode-tokens", "4", "--prompt-tokens", "32", "--dtypes", "f32", "q8_0"])
    res = json.loads(out.read_text())
    assert set(res["dtypes"]) == {"f32", "q8_0"} and (tmp_path / "work" / "widths-q8_0.gguf").is_file()
    n_dense = sum(p.numel() for p in dense.parameters())
    for block in res["dtypes"].values():
        assert set(block["models"]) == {"widths", "depth"}
        for rec in block["models"].values():
            m = rec["measured"]
            assert len(m["decode_ratio_rounds"]) == 1 and m["decode_speedup"] > 0 and m["prompt_tok_s"] > 0
    depth = res["dtypes"]["f32"]["models"]["depth"]["stats"]
    assert res["dtypes"]["f32"]["dense"]["params_all"] == n_dense and depth["blocks"] == 4
    assert "| q8_0 | widths | deci, 6 |" in out.with_suffix(".md").read_text()


def test_bad_arguments_are_refused(tmp_path):
    mod = _script()
    with pytest.raises(SystemExit):
        mod.main(["dense=x.gguf", "--dense", "d.gguf", "--work", str(tmp_path), "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit, match="no model.gguf under it"):
        mod.find_gguf(tmp_path)
