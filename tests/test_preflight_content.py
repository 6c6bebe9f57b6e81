"""Preflight reads content, not only names (issue 24 item 4), and a run never ends in a traceback (item 5).

Each bad input of the issue is refused by ``--dry-run`` (exit 2, an ``error:`` naming the setting, the file —
and for JSONL the line — and the fix) before any model loads: before this change each passed ``--dry-run`` and
failed minutes later as a traceback. Failures inside a stage print one paragraph naming the stage and the fix,
exit 2 (user) or 1 (internal), and leave the traceback in ``run.log``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from prunelab.run import main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "tests/data/tiny_corpus.txt"


def _dry(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([*argv, "--dry-run"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _debug_with_calibration(tmp_path: Path, source: dict) -> str:
    raw = yaml.safe_load((ROOT / "recipes/debug.yaml").read_text())
    raw["stages"]["calibrate"]["source"] = source
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama saved as a local model folder (config.json + model.safetensors + tokenizer)."""
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "is empty"),
    (b"\x87\x00\x13binary" * 200, "is binary"),
    (b"caf\xe9 latin-1 text " * 100, "is not UTF-8"),
    (b"ten tokens", "holds at most"),
    (b"   \n\n  ", "only whitespace"),
], ids=["empty", "binary", "latin1", "ten-tokens", "whitespace"])
def test_calibration_text_content(tmp_path, capsys, content, expected):
    file = tmp_path / "calib.txt"
    file.write_bytes(content)
    rc, err = _dry(capsys, "recipes/debug.yaml", f"stages.calibrate.source.path={file}")
    assert rc == 2 and "stages.calibrate.source" in err and expected in err, err


def test_too_few_tokens_for_all_windows(tmp_path, capsys):
    """300 bytes hold one 64-token window but not 4 distinct ones: num_samples × seq_len counts."""
    file = tmp_path / "calib.txt"
    file.write_text("x" * 200)
    rc, err = _dry(capsys, "recipes/debug.yaml", f"stages.calibrate.source.path={file}")
    assert rc == 2 and "4 windows × seq_len 64 = 256" in err and "lower num_samples or seq_len" in err, err


@pytest.mark.parametrize(("lines", "expected"), [
    (['{"text": "a"}', '{bad json'], ":2: not valid JSON"),
    (['{"text": "a"}', '[1, 2]'], ":2: a JSON list, not an object"),
    (['{"txt": "' + "a" * 400 + '"}'], ":1: the row has no field 'text'"),
], ids=["bad-json", "not-object", "missing-field"])
def test_jsonl_errors_name_file_and_line(tmp_path, capsys, lines, expected):
    file = tmp_path / "calib.jsonl"
    file.write_text("\n".join(lines) + "\n")
    rc, err = _dry(capsys, "recipes/debug.yaml", f"stages.calibrate.source.path={file}")
    assert rc == 2 and f"{file}{expected}" in err, err
    if "field" in expected:
        assert "stages.calibrate.source.text_field" in err


def test_bad_answer_key_in_a_qa_file(tmp_path, capsys):
    good = {"question": "Which?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    file = tmp_path / "qa.jsonl"
    file.write_text("\n".join(json.dumps({**good, "question": "q" * 300}) for _ in range(3)) + "\n"
                    + json.dumps({**good, "answerKey": "Z"}) + "\n")
    rc, err = _dry(capsys, _debug_with_calibration(tmp_path, {"qa_text": str(file)}))
    assert rc == 2 and f"{file}:4: answerKey 'Z' is not one of the choice labels" in err, err


def test_a_mix_part_that_gets_no_window(capsys, tmp_path):
    source = {"mix": [{"source": {"path": CORPUS}, "weight": 1}, {"source": {"path": CORPUS}, "weight": 1e-9}]}
    rc, err = _dry(capsys, _debug_with_calibration(tmp_path, source))
    assert rc == 2 and "stages.calibrate.source.mix.1.weight" in err and "0 of the 4 windows" in err, err


def test_evaluation_text_too_short_for_one_window(tmp_path, capsys):
    file = tmp_path / "eval.txt"
    file.write_text("short text")
    rc, err = _dry(capsys, "recipes/debug.yaml", f"stages.eval_pruned.perplexity.tiny.source.path={file}")
    assert rc == 2 and "stages.eval_pruned.perplexity.tiny.source" in err and "one window of seq_len=128" in err, err


def test_a_good_local_model_folder_passes(tiny_folder, capsys):
    rc, err = _dry(capsys, "recipes/debug.yaml", f"model.source={tiny_folder}")
    assert rc == 0, err


def _corrupt(folder: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / how
    shutil.copytree(folder, bad)
    weights = bad / "model.safetensors"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        weights.write_bytes(b"\xff" * 4096)
    elif how == "missing":
        weights.unlink()
    elif how == "bad-header":
        weights.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 64)
    elif how == "other-config":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["num_hidden_layers"] = 8
        (bad / "config.json").write_text(json.dumps(cfg))
    elif how == "other-vocab":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["vocab_size"] = 300
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize(("how", "expected"), [
    ("truncated", "is truncated"), ("garbage", "is not a safetensors file"), ("missing", "no weights"),
    ("bad-header", "header is not JSON"), ("other-config", "none for block(s) [6, 7]"),
    ("other-vocab", "vocab_size × hidden_size"),
])
def test_weights_refused_from_their_headers(tiny_folder, tmp_path, capsys, how, expected):
    rc, err = _dry(capsys, "recipes/debug.yaml", f"model.source={_corrupt(tiny_folder, tmp_path, how)}")
    assert rc == 2 and "model.source" in err and expected in err, err


@pytest.mark.parametrize(("device", "expected"), [
    ("banana", "is not a device"), ("cuda:x", "is not a device"), ("cuda", "no CUDA device is visible"),
])
def test_devices(capsys, monkeypatch, device, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever machine runs the test
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = _dry(capsys, "recipes/debug.yaml", f"model.device={device}")
    assert rc == 2 and "model.device" in err and expected in err, err


def test_speed_batch_size_zero(capsys):
    rc, err = _dry(capsys, "recipes/debug.yaml", "stages.eval_pruned.speed={batch_sizes: [0]}")
    assert rc == 2 and "stages.eval_pruned.speed.batch_sizes" in err, err


def test_output_dir_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    rc, err = _dry(capsys, "recipes/debug.yaml", "--output-dir", str(file))
    assert rc == 2 and "output_dir" in err and "is a file" in err, err


def test_hub_id_not_in_the_cache_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rc, err = _dry(capsys, "recipes/debug.yaml", "model.source=some-org/not-cached")
    assert rc == 2 and "not in the local Hugging Face cache" in err and "huggingface-cli download some-org/not-cached" in err


def test_hub_unreachable_before_a_real_run(monkeypatch):
    """Not offline, not cached, and the hub's host refuses: refused before the load stage's minute of retries
    (a closed local port stands in for the hub: no network is touched)."""
    from prunelab.preflight import preflight
    from prunelab.recipe import RecipeError, load_recipe

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    recipe = load_recipe("recipes/debug.yaml", ["model.source=some-org/not-cached"])
    assert preflight(recipe) is not None  # a dry run touches no network: the load stage would download
    with pytest.raises(RecipeError, match="cannot be reached"):
        preflight(recipe, probe_hub=True)


# ---------------------------------------------------------------- failures at run time: no traceback, run.log


def _run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["recipes/debug.yaml", "--output-dir", str(tmp_path / "runs"), "--no-progress", *extra])
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize(("exc", "code"), [(ValueError("the text is odd; use another"), 2), (TypeError("boom"), 1),
                                           (MemoryError(), 2)])
def test_a_stage_failure_is_one_paragraph_and_run_log_keeps_the_traceback(tmp_path, capsys, monkeypatch, exc, code):
    import dataclasses

    import prunelab.runner as runner

    def fail(ctx, cfg):
        raise exc

    real = runner._spec
    monkeypatch.setattr(runner, "_spec", lambda t: dataclasses.replace(real(t), run=fail) if t == "score" else real(t))
    rc, err = _run(capsys, tmp_path)
    assert rc == code, err
    assert "Traceback" not in err
    run_dir = tmp_path / "runs" / "debug"
    assert "stage 04-score" in err and str(run_dir / "run.log") in err and "--resume" in err, err
    log = (run_dir / "run.log").read_text()
    assert "Traceback" in log and type(exc).__name__ in log and "02-calibrate: running" in log
    assert (run_dir / "02-calibrate" / "done.json").is_file()  # finished stages kept: resumable
    if code == 1:
        assert "internal error" in err and "bug in prunelab" in err
    else:
        assert "Fix:" in err


def test_every_run_writes_run_log_and_none_into_a_refused_folder(tmp_path, capsys):
    rc, err = _run(capsys, tmp_path)
    assert rc == 0, err
    log = (tmp_path / "runs" / "debug" / "run.log").read_text()
    assert "01-load: running" in log and "07-export: running" in log
    # a folder prunelab did not make: --force is refused and nothing is written into it
    other = tmp_path / "out" / "Documents"
    other.mkdir(parents=True)
    (other / "thesis.txt").write_text("t")
    capsys.readouterr()
    rc = main(["recipes/debug.yaml", "--output-dir", str(tmp_path / "out"), "name=Documents", "--force"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert sorted(p.name for p in other.iterdir()) == ["thesis.txt"]


def test_progress_bars_off_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """capsys's stderr is not a terminal: no bar's carriage returns in the output, even without --no-progress."""
    capsys.readouterr()
    rc = main(["recipes/debug.yaml", "--output-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 0 and "\r" not in err and "it/s]" not in err, err[-2000:]
