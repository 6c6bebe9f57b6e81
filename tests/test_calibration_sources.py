"""Calibration and evaluation sources beyond plain files: qa_text, self_generated, mix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from prunelab.stages.calibration.sources import (
    CalibrationSource,
    MixSource,
    SelfGeneratedSource,
    calibration_windows,
    split_counts,
)
from prunelab.stages.io.qa import QATextSource, render_qa
from prunelab.stages.io.text import read_text
from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

ARC = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc" / "arc_easy_test.jsonl"
SOURCE = TypeAdapter(CalibrationSource)


@pytest.mark.skipif(not ARC.is_file(), reason="../shared/data/arc/arc_easy_test.jsonl is not on this machine")
def test_qa_text_renders_the_shared_arc_file_question_then_gold_answer() -> None:
    text = read_text(QATextSource(qa_text=str(ARC)))
    blocks = text.split("\n\n")
    rows = [json.loads(line) for line in ARC.read_text().splitlines() if line.strip()]
    assert len(blocks) == len(rows) == 2376
    assert blocks[0] == ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?\n"
                         "Answer: Sunlight is the source of energy for nearly all ecosystems.")
    for block, row in zip(blocks, rows, strict=True):
        gold = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        assert block == f"Question: {row['question'].strip()}\nAnswer: {gold.strip()}"


def test_qa_text_plain_pairs_template_and_bad_rows(tmp_path: Path) -> None:
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n" + json.dumps({"question": "Sky?", "answer": "blue"}))
    assert render_qa(QATextSource(qa_text=str(f), template="Q: {question} A: {answer}", join="\n")) == "Q: 2+2? A: 4\nQ: Sky? A: blue"
    f.write_text(json.dumps({"question": "x", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}))
    with pytest.raises(ValueError, match="qa.jsonl:1: a row is neither ARC layout"):
        render_qa(QATextSource(qa_text=str(f)))
    with pytest.raises(ValidationError, match="give a .jsonl file"):
        QATextSource(qa_text="questions.txt")


def test_source_kinds_are_told_apart_and_bad_keys_named() -> None:
    assert type(SOURCE.validate_python({"path": "a.txt"})).__name__ == "TextSource"
    assert isinstance(SOURCE.validate_python({"qa_text": "a.jsonl"}), QATextSource)
    assert isinstance(SOURCE.validate_python({"self_generated": {"temperature": 0.8}}), SelfGeneratedSource)
    assert isinstance(SOURCE.validate_python({"mix": [{"source": {"path": "a.txt"}, "weight": 1},
                                                      {"source": {"self_generated": {}}, "weight": 2}]}), MixSource)
    with pytest.raises(ValidationError, match="top_pp"):
        SOURCE.validate_python({"self_generated": {"top_pp": 0.9}})


def test_mix_splits_windows_by_weight_remainder_to_the_heaviest() -> None:
    assert split_counts([3, 1], 8) == [6, 2]
    assert split_counts([1, 1, 1], 10) == [4, 3, 3]
    assert sum(split_counts([0.2, 0.5, 0.3], 7)) == 7


@pytest.fixture
def gen_setup():
    return tiny_llama(num_layers=2), byte_tokenizer()


def test_self_generated_is_seeded_cached_and_resumes_without_regenerating(gen_setup, tmp_path: Path, monkeypatch,
                                                                          caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="prunelab.stages.calibration.generate")
    model, tok = gen_setup
    src = SOURCE.validate_python({"self_generated": {"batch_size": 2, "temperature": 1.0}})
    first = calibration_windows(src, model, tok, 5, 24, 7, tmp_path / "a", progress=False)
    again = calibration_windows(src, model, tok, 5, 24, 7, tmp_path / "b", progress=False)
    assert first.shape == (5, 24) and torch.equal(first, again)  # same seed, fresh cache: same text
    assert (first[:, 0] == tok.bos_token_id).all()
    other = calibration_windows(src, model, tok, 5, 24, 8, tmp_path / "c", progress=False)
    assert not torch.equal(first, other)
    shards = sorted((tmp_path / "a").glob("shard-*.pt"))
    assert len(shards) == 3
    # Killed after two batches: the third shard is gone. Resuming regenerates only that one.
    shards[-1].unlink()
    calls = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    resumed = calibration_windows(src, model, tok, 5, 24, 7, tmp_path / "a", progress=False)
    assert torch.equal(resumed, first)
    assert 0 < len(calls) <= 24  # one batch of (24 - 1) decode steps + its prefill, not three
    assert "(2 of 3 batches read back from the cache)" in caplog.text  # said even with the bar off
    calls.clear()
    calibration_windows(src, model, tok, 5, 24, 7, tmp_path / "a", progress=False)
    assert calls == []  # everything cached
    assert "self-generating 5 × 24 tokens in 3 batches" in caplog.text and "(3 of 3 batches" in caplog.text
    changed = SOURCE.validate_python({"self_generated": {"batch_size": 2, "temperature": 0.7}})
    assert not torch.equal(calibration_windows(changed, model, tok, 5, 24, 7, tmp_path / "a", progress=False), first)


def test_self_generated_top_k_1_is_greedy_decoding(gen_setup, tmp_path: Path) -> None:
    """The cached sampling loop continues exactly as transformers' greedy generate does."""
    model, tok = gen_setup
    src = SOURCE.validate_python({"self_generated": {"batch_size": 4, "top_k": 1}})
    ours = calibration_windows(src, model, tok, 4, 20, 0, tmp_path, progress=False)
    ref = model.generate(ours[:, :1], max_new_tokens=19, min_new_tokens=19, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(ours, ref)


def test_self_generated_from_text_prompts(gen_setup, tmp_path: Path) -> None:
    model, tok = gen_setup
    src = SOURCE.validate_python({"self_generated": {"prompt": {"path": "tests/data/tiny_corpus.txt"}, "prompt_tokens": 6,
                                                     "temperature_end": 0.5}})
    out = calibration_windows(src, model, tok, 3, 16, 0, tmp_path, progress=False)
    prompts = calibration_windows(SOURCE.validate_python({"path": "tests/data/tiny_corpus.txt"}), model, tok, 3, 6, 0,
                                  tmp_path / "x", progress=False)
    assert torch.equal(out[:, :6], prompts)


def test_calibrate_stage_with_self_generated_resumes_from_its_folder(tmp_path: Path) -> None:
    import yaml

    from prunelab.run import main

    recipe = yaml.safe_load(Path("recipes/debug.yaml").read_text())
    recipe["stages"]["calibrate"]["source"] = {"self_generated": {"batch_size": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    args = [str(tmp_path / "r.yaml"), "--output-dir", str(tmp_path), "--no-progress", "stages.calibrate.seq_len=32"]
    assert main(args) == 0
    run = tmp_path / "debug"
    cal = torch.load(run / "02-calibrate" / "calibration.pt")
    assert cal.shape == (4, 32) and len(list((run / "02-calibrate" / "generated").glob("shard-*.pt"))) == 2
    stamp = json.loads((run / "02-calibrate" / "done.json").read_text())["finished"]
    assert main([*args, "--resume"]) == 0
    assert json.loads((run / "02-calibrate" / "done.json").read_text())["finished"] == stamp
