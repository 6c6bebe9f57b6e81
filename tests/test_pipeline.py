"""The whole path on tiny random models: surgery, export/reload, metrics contract, resume after kill -9."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prunelab.run import main
from prunelab.stages.arch.llama import adapter_for
from prunelab.stages.surgery.apply import PlanError, apply_plan, remove_blocks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_untied"])
def test_remove_blocks_equals_skipping_them(request, fixture, calib):
    model = request.getfixturevalue(fixture)
    adapter = adapter_for(model)
    with torch.no_grad():
        ref = adapter.boundary_states(calib, skip=frozenset({1, 3}))[-1]
        ref_logits = model.lm_head(model.model.norm(ref))
    remove_blocks(model, [1, 3])
    assert model.config.num_hidden_layers == len(model.model.layers)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(model.model.layers)))
    with torch.no_grad():
        assert torch.equal(model(calib).logits, ref_logits)


def test_generate_with_kv_cache_after_surgery(tiny_model):
    remove_blocks(tiny_model, [0, 4])
    prompt = torch.tensor([[5, 9, 11, 40, 7]])
    with torch.no_grad():
        cached = tiny_model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=2)
        uncached = tiny_model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=2)
    assert cached.shape[1] == 17 and torch.equal(cached, uncached)


def test_layer_types_follow_the_kept_blocks():
    from prunelab.stages.io.tiny import tiny_llama

    model = tiny_llama(num_layers=4, model_type="qwen2")
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    remove_blocks(model, [0])
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]


def test_plan_reapplies_to_fresh_copy_and_refuses_wrong_model(tiny_model):
    fresh = copy.deepcopy(tiny_model)
    plan = {"kind": "depth", "removed_blocks": [2, 5], "layers_before": 6}
    apply_plan(tiny_model, plan)
    apply_plan(fresh, json.loads(json.dumps(plan)))
    a, b = tiny_model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PlanError, match="already pruned"):
        apply_plan(tiny_model, plan)
    with pytest.raises(PlanError, match="unknown plan kind"):
        apply_plan(fresh, {"kind": "sideways"})


def _run(tmp_path, *extra):
    return main(["recipes/debug.yaml", "--output-dir", str(tmp_path), "--no-progress", *extra])


def test_debug_recipe_end_to_end(tmp_path):
    assert _run(tmp_path) == 0
    run_dir = tmp_path / "debug"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the contract in shared/DESIGN.md
    assert set(metrics) >= {"recipe", "model", "eval", "plan", "timing_s", "peak_memory_mb", "versions"}
    assert set(metrics["model"]) == {"source", "params_before", "params_after", "layers_before", "layers_after"}
    assert metrics["model"]["layers_before"] == 6 and metrics["model"]["layers_after"] == 4
    assert set(metrics["timing_s"]) >= {"calibrate", "score", "prune", "recover", "evaluate"}
    assert set(metrics["eval"]) == {"dense", "pruned"}
    for label in ("dense", "pruned"):
        r = metrics["eval"][label]["tiny"]
        assert r["seq_len"] == 128 and r["tokens"] == 4096 and "windows of 128" in r["protocol"]
    assert len(metrics["plan"]["removed_blocks"]) == metrics["plan"]["removed_units"] == 2
    assert {"torch", "transformers", "prunelab"} <= set(metrics["versions"])
    # artifacts
    assert (run_dir / "recipe.resolved.yaml").is_file()
    assert json.loads((run_dir / "05-prune" / "plan.json").read_text())["removed_blocks"] == metrics["plan"]["removed_blocks"]
    scores = json.loads((run_dir / "04-score" / "scores.json").read_text())
    assert set(scores) == {"block_influence", "angular_distance", "ppl", "taylor_plus", "sleb", "magnitude", "random"}
    # exported model: vanilla transformers, equal logits, no quantization leftovers, a model card
    from transformers import AutoModelForCausalLM

    model_dir = run_dir / "model"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and "quantization_config" not in cfg
    assert (model_dir / "model.safetensors").is_file()
    card = (model_dir / "README.md").read_text()
    assert str(metrics["plan"]["removed_blocks"]) in card and "PPL" in card
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    from prunelab.recipe import ModelConfig
    from prunelab.stages.io.models import load_model
    from prunelab.stages.surgery.apply import apply_plan as _apply

    pruned, _ = load_model(ModelConfig(source="tiny-random-llama"))
    _apply(pruned, json.loads((run_dir / "05-prune" / "plan.json").read_text()))
    ids = torch.tensor([[0, 50, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        assert (fresh(ids).logits - pruned(ids).logits).abs().max().item() <= 1e-5
    done = json.loads((run_dir / "07-export" / "done.json").read_text())
    assert done["outputs"]["reload_max_abs_diff"] <= 1e-5


def test_existing_run_needs_resume_or_force(tmp_path, capsys):
    assert _run(tmp_path) == 0
    assert _run(tmp_path) == 2
    assert "--resume" in capsys.readouterr().err
    assert _run(tmp_path, "--force") == 0


def test_resume_reuses_finished_stages_and_reruns_changed_ones(tmp_path):
    assert _run(tmp_path) == 0
    first = json.loads((tmp_path / "debug" / "metrics.json").read_text())
    score_done = (tmp_path / "debug" / "04-score" / "done.json").read_text()
    assert _run(tmp_path, "--resume") == 0
    assert (tmp_path / "debug" / "04-score" / "done.json").read_text() == score_done  # not re-run
    again = json.loads((tmp_path / "debug" / "metrics.json").read_text())
    assert again["eval"] == first["eval"] and again["plan"] == first["plan"]
    # a changed prune target invalidates prune and everything after it, not the score
    assert _run(tmp_path, "--resume", "stages.prune.num_blocks=3") == 0
    changed = json.loads((tmp_path / "debug" / "metrics.json").read_text())
    assert changed["model"]["layers_after"] == 3
    assert (tmp_path / "debug" / "04-score" / "done.json").read_text() == score_done


def test_kill_9_during_scoring_then_resume_gives_same_metrics(tmp_path):
    """A real SIGKILL in the middle of scoring; --resume must reproduce the uninterrupted numbers."""
    overrides = ["stages.calibrate.num_samples=48", "stages.calibrate.seq_len=128", "--no-progress"]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    cmd = [sys.executable, "pipeline/run.py", "recipes/debug.yaml", *overrides]
    subprocess.run([*cmd, "--output-dir", str(ref_dir)], cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, "--output-dir", str(kill_dir)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = kill_dir / "debug" / "04-score" / "partial"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.is_dir() and any(partial.glob("*.json"))):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (kill_dir / "debug" / "04-score" / "done.json").exists(), "scoring finished before the kill"
    assert not (kill_dir / "debug" / "model").exists()
    subprocess.run([*cmd, "--output-dir", str(kill_dir), "--resume"], cwd=ROOT, check=True, capture_output=True)
    ref = json.loads((ref_dir / "debug" / "metrics.json").read_text())
    got = json.loads((kill_dir / "debug" / "metrics.json").read_text())
    assert got["eval"] == ref["eval"] and got["plan"] == ref["plan"] and got["model"] == ref["model"]
    assert json.loads((kill_dir / "debug" / "04-score" / "scores.json").read_text()).keys() == \
        json.loads((ref_dir / "debug" / "04-score" / "scores.json").read_text()).keys()

