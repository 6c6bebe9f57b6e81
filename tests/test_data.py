"""Text sources (local .txt/.jsonl, `datasets` builders), seeded sampling, checksums, perplexity protocol."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prunelab.recipe import TextSource
from prunelab.stages.evaluation.perplexity import windowed_perplexity
from prunelab.stages.io.text import read_text, sample_windows, tokenize_text, verify_checksum
from prunelab.stages.io.tiny import byte_tokenizer


def test_txt_is_read_as_is_with_crlf_normalised(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"line one\r\n\r\nline two\r\n")
    assert read_text(TextSource(path=str(f))) == "line one\n\nline two\n"


def test_jsonl_rows_are_joined_and_bad_field_is_named(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps({"body": s}) for s in ["alpha", "beta", "gamma"]))
    assert read_text(TextSource(path=str(f), text_field="body")) == "alpha\n\nbeta\n\ngamma"
    with pytest.raises(ValueError, match="set text_field to one of \\['body'\\]"):
        read_text(TextSource(path=str(f)))


def test_datasets_builder_with_local_files_offline():
    src = TextSource(dataset="text", data_files="tests/data/tiny_corpus.txt", split="train")
    text = read_text(src)
    assert "Section 1 =" in text and len(text) > 10_000


def test_sampling_is_seeded_and_in_range():
    ids = torch.arange(1000)
    a, b, c = sample_windows(ids, 5, 32, 0), sample_windows(ids, 5, 32, 0), sample_windows(ids, 5, 32, 1)
    assert a.shape == (5, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 32)) for w in a)  # consecutive tokens
    with pytest.raises(ValueError, match="fewer than seq_len"):
        sample_windows(torch.arange(10), 1, 32, 0)


def test_checksums_accept_the_shared_files_and_refuse_a_changed_one(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "x.txt"
    f.write_text("hello")
    import hashlib

    (tmp_path / "SHA256SUMS").write_text(f"{hashlib.sha256(b'hello').hexdigest()}  d/x.txt\n")
    assert verify_checksum(str(f)).endswith("sha256 ok")
    f.write_text("hellO")
    with pytest.raises(ValueError, match="does not match"):
        verify_checksum(str(f))


def test_windowed_perplexity_protocol(tiny_model):
    """Non-overlapping windows, token budget respected, mean NLL over seq_len-1 predictions per window."""
    tok = byte_tokenizer()
    ids = tokenize_text(tok, read_text(TextSource(path="tests/data/tiny_corpus.txt")))
    r = windowed_perplexity(tiny_model, ids, seq_len=64, max_tokens=1000, progress=False)
    assert r["windows"] == 15 and r["tokens"] == 960 and r["predicted_tokens"] == 15 * 63
    windows = ids[:960].view(15, 64)
    with torch.no_grad():
        losses = [tiny_model(w[None], labels=w[None]).loss.item() for w in windows]
    assert r["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
