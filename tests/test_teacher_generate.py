"""``data.teacher_generate``: recovery text the dense model samples from prompts drawn from the data's source —
validated torch-free, seeded, cached in the recover stage's folder (no regeneration on resume), and trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunelab.recipe import RecipeError, load_recipe

RECIPE = "recipes/debug-recover.yaml"
DATA = {"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 32, "max_samples": 6}
GEN = {"num_samples": 5, "prompt_tokens": 6, "batch_size": 2}


def _data(**gen):
    from prunelab.stages.recovery.config import RecoveryData

    return RecoveryData(**{**DATA, "teacher_generate": {**GEN, **gen}})


def test_settings_validate_and_leave_old_dumps_alone():
    cfg = load_recipe(RECIPE).stages["recover"]
    assert "teacher_generate" not in cfg.model_dump(mode="json")["data"]
    assert "teacher_generate" not in cfg.v1_settings()["data"]
    gen = load_recipe(RECIPE, ["stages.recover.data.teacher_generate={num_samples: 8}"]).stages["recover"]
    assert gen.data.teacher_generate.num_samples == 8 and gen.data.teacher_generate.with_source
    assert gen.v1_settings()["data"]["teacher_generate"]["num_samples"] == 8  # never a version-1 hash
    assert type(gen).model_validate(gen.model_dump(mode="json")) == gen
    for override, needle in [
        ("stages.recover.data.teacher_generate={num_samples: 0}", "teacher_generate.num_samples"),
        ("stages.recover.data.teacher_generate={num_samples: 4, prompt_tokens: 64}", "leaves nothing to generate"),
        ("stages.recover.data.teacher_generate={num_samples: 4, temp: 1}", "teacher_generate.temp"),
        ("stages.recover.data.teacher_generate={}", "num_samples"),
    ]:
        with pytest.raises(RecipeError) as err:
            load_recipe(RECIPE, [override])
        assert needle in str(err.value), (override, str(err.value))
    with pytest.raises(ValueError, match="use format: text"):
        from prunelab.stages.recovery.config import RecoveryData

        RecoveryData(source={"path": "x.jsonl"}, format="alpaca", teacher_generate={"num_samples": 2})


def test_seeded_cached_and_continues_the_sources_windows(tmp_path: Path, monkeypatch):
    from prunelab.stages.io.text import sample_windows, tokenized_source
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama
    from prunelab.stages.recovery.generated import teacher_text

    model, tok, data = tiny_llama(num_layers=2), byte_tokenizer(), _data()
    first = teacher_text(data, model, tok, 3, tmp_path / "a", progress=False)
    again = teacher_text(data, model, tok, 3, tmp_path / "b", progress=False)
    assert first.shape == (5, 32) and torch.equal(first, again)  # same seed, fresh cache: the same text
    assert not torch.equal(first, teacher_text(data, model, tok, 4, tmp_path / "c", progress=False))
    prompts = sample_windows(tokenized_source(tok, data.source), 5, 6, 3)
    assert torch.equal(first[:, :6], prompts)  # each sequence starts with a window of the source
    assert len(list((tmp_path / "a").glob("shard-*.pt"))) == 3
    calls = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(teacher_text(data, model, tok, 3, tmp_path / "a", progress=False), first)
    assert calls == []  # everything read back from the cache
    hotter = teacher_text(_data(temperature=2.0), model, tok, 3, tmp_path / "a", progress=False)
    assert calls and not torch.equal(hotter, first)  # a changed setting makes the shards again


def test_dataset_adds_or_replaces_the_source_blocks(tmp_path: Path):
    from prunelab.stages.io.tiny import byte_tokenizer
    from prunelab.stages.recovery.data import build_dataset

    gen = torch.arange(5 * 32).view(5, 32) % 200 + 3
    both = build_dataset(byte_tokenizer(), _data(), gen)
    assert len(both) == 6 + 5 and torch.equal(both[10]["input_ids"], gen[4]) and torch.equal(both[10]["labels"], gen[4])
    alone = build_dataset(byte_tokenizer(), _data(with_source=False), gen)
    assert len(alone) == 5 and torch.equal(alone[0]["input_ids"], gen[0])
    with pytest.raises(ValueError, match="were not generated"):
        build_dataset(byte_tokenizer(), _data(), None)


def test_recover_stage_trains_on_generated_text_and_resumes_without_regenerating(tmp_path: Path, monkeypatch):
    from prunelab.run import main
    from prunelab.stages.calibration import generate

    args = [RECIPE, "--output-dir", str(tmp_path), "--no-progress", "stages.recover.control=false",
            "stages.recover.lora.dropout=0.0", "stages.recover.loss=kd",
            "stages.recover.data.teacher_generate={num_samples: 8, prompt_tokens: 8, batch_size: 4, with_source: false}"]
    assert main(args) == 0
    run = tmp_path / "debug-recover"
    stage = run / "06-recover"
    assert len(list((stage / "teacher-generated").glob("shard-*.pt"))) == 2
    samples = json.loads((stage / "samples.json").read_text())
    assert samples["dataset_size"] == 8  # the generated sequences alone
    metrics = json.loads((run / "metrics.json").read_text())
    rec = metrics["recover"]["pruned"]
    assert rec["final_loss"] < rec["first_loss"]
    # The stage runs again (its done.json is gone): the text is read back, never sampled again.
    (stage / "done.json").unlink()
    adapter = (stage / "adapter" / "adapter_model.safetensors").read_bytes()

    def no_sampling(*a, **k):
        raise AssertionError("teacher text was generated again")

    monkeypatch.setattr(generate, "sample", no_sampling)
    assert main([*args, "--resume"]) == 0
    assert (stage / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
