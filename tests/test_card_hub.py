"""Model card (Hub front matter: base_model, license, tags, pipeline_tag, model-index), the adapter card, and
export.push_to_hub up to the commit it would send (HfApi replaced: no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _front(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def base_folder(tmp_path):
    """A local base model: the tiny Llama saved with a model card that names its license."""
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

    folder = tmp_path / "base"
    tiny_llama(num_layers=4).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# base\n")
    return folder


def _recipe(source: str, out: Path, **export: object) -> dict:
    return {"name": "card", "model": {"source": source}, "output_dir": str(out),
            "stages": {"calibrate": {"type": "calibrate", "source": {"path": str(ROOT / "tests/data/tiny_corpus.txt")},
                                     "num_samples": 2, "seq_len": 32},
                       "score": {"type": "score", "criteria": ["block_influence"]},
                       "prune": {"type": "prune", "criterion": "block_influence", "num_blocks": 1},
                       "eval": {"type": "evaluate", "perplexity": {"tiny": {
                           "source": {"path": str(ROOT / "tests/data/tiny_corpus.txt")}, "seq_len": 64, "max_tokens": 512}}},
                       "export": {"type": "export", **export}}}


def test_model_card_front_matter(base_folder, tmp_path):
    import prunelab

    prunelab.run(_recipe(str(base_folder), tmp_path / "runs"))
    text = (tmp_path / "runs" / "card" / "model" / "README.md").read_text()
    meta = _front(text)
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert {"prunelab", "pruned", "depth-pruning"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder: no hub id to name
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0]["type"] == "perplexity" and result["dataset"]["name"] == "tiny"
    ppl = json.loads((tmp_path / "runs" / "card" / "metrics.json").read_text())["eval"]["pruned"]["tiny"]["ppl"]
    assert result["metrics"][0]["value"] == pytest.approx(ppl, abs=1e-4)
    assert "## Plan" in text and "Depth pruning by `block_influence`" in text and "License: not stated" not in text


def test_card_without_license_says_so_and_names_hub_base():
    from prunelab.stages.io.card import base_license, base_model_of, card_data

    data, notes = card_data("tiny-random-llama", None, ["prunelab"], {}, "pruned", "x")
    assert data.license is None and notes and "License: not stated" in notes[0]
    assert base_model_of("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert base_model_of("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct" and base_model_of("tiny-random-llama") is None
    assert base_license("tiny-random-llama") is None


def test_zero_shot_results_in_model_index():
    from prunelab.stages.io.card import eval_results

    evals = {"dense": {"boolq": {"acc": 0.7}}, "pruned": {"boolq": {
        "acc": 0.61, "acc_stderr": 0.01, "metrics": ["acc"], "samples": 100, "num_fewshot": 0, "lm_eval_version": "0.4.13"}}}
    [r] = eval_results(evals, "pruned", "m")
    assert (r.metric_type, r.metric_value, r.dataset_name) == ("acc", 0.61, "boolq")


def test_adapter_card(tmp_path):
    from prunelab.stages.io.card import write_adapter_card

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n[More Information Needed]")
    info = {"label": "pruned", "steps": 20, "first_loss": 5.5, "final_loss": 3.25, "tokens_per_s": 1000.0, "processes": 1}
    settings = {"lora": {"rank": 8, "alpha": 16}, "loop": {"batch_size": 4}, "data": {"source": {"path": "valid.txt"}},
                "loss": {"type": "ce"}}
    write_adapter_card(tmp_path, "HuggingFaceTB/SmolLM2-135M", None, "lora", info, settings, "recover-6blocks")
    text = (tmp_path / "README.md").read_text()
    meta = _front(text)
    assert meta["library_name"] == "peft" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and "lora" in meta["tags"]
    assert "More Information Needed" not in text and "5.5000 → 3.2500" in text and "| steps | 20" in text
    assert "valid.txt" in text and "rank 8" in text


class FakeApi:
    """Records what prunelab would send to the Hub."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def create_commit(self, **kw):
        self.calls.append(("create_commit", kw))
        return type("Info", (), {"oid": "abc123", "commit_url": "https://huggingface.co/x/commit/abc123"})()


def test_push_to_hub_sends_one_commit_with_every_file(base_folder, tmp_path, monkeypatch):
    """export.push_to_hub through the export stage (HfApi replaced): create_repo(private, exist_ok) then one
    create_commit whose CommitOperationAdd paths are the files of model/, with the card."""
    import huggingface_hub

    import prunelab

    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: api)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    metrics_dir = tmp_path / "runs"
    prunelab.run(_recipe(str(base_folder), metrics_dir, push_to_hub={"repo_id": "me/tiny-pruned", "private": True}))
    (name, repo), (commit_name, commit) = api.calls
    assert name == "create_repo" and repo == {"repo_id": "me/tiny-pruned", "private": True, "repo_type": "model", "exist_ok": True}
    assert commit_name == "create_commit" and commit["commit_message"] == "prunelab: card"
    model_dir = metrics_dir / "card" / "model"
    sent = {op.path_in_repo: op.path_or_fileobj for op in commit["operations"]}
    assert set(sent) == {p.name for p in model_dir.iterdir() if p.is_file()} and "README.md" in sent
    assert {"config.json", "model.safetensors"} <= set(sent) and all(Path(v).parent == model_dir for v in sent.values())


def test_push_to_hub_settings_checked(monkeypatch):
    from prunelab.preflight import preflight
    from prunelab.recipe import RecipeError, validate

    raw = _recipe("tiny-random-llama", Path("runs"), push_to_hub={"repo_id": "no-slash"})
    with pytest.raises(RecipeError, match=r"stages\.export\.push_to_hub\.repo_id"):
        validate(raw)
    raw["stages"]["export"]["push_to_hub"] = {"repo_id": "me/x"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="HF_HUB_OFFLINE"):
        preflight(validate(raw))
    raw["stages"]["export"].pop("push_to_hub")
    assert "push_to_hub" not in validate(raw).stages["export"].model_dump()  # unchanged hash for existing runs
