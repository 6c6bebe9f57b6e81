"""prunelab's Python API (pipeline.api, ``prunelab.*`` after the rename): the docs' examples run, ``prune`` on a model
in memory gives the plan and logits the CLI gives for the same recipe, calibration in every form, ``run`` / ``load``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import prunelab
from prunelab.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "tiny_corpus.txt"


def _python_blocks(doc: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", doc.read_text(encoding="utf-8"), re.S | re.M)


@pytest.mark.parametrize("index", range(len(_python_blocks(ROOT / "docs" / "api.md"))))
def test_docs_api_examples_run(index, tmp_path, monkeypatch):
    """Every ```python block of docs/api.md, executed as written (from the repository root, offline). The docs name
    the final package ``prunelab``; until the rename, that name is this checkout's ``pipeline`` package."""
    import sys

    monkeypatch.setitem(sys.modules, "prunelab", prunelab)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    exec(compile(_python_blocks(ROOT / "docs" / "api.md")[index], f"docs/api.md block {index}", "exec"), {})


WIDTH_RECIPE = {
    "name": "api-width", "seed": 0, "model": {"source": "tiny-random-llama"},
    "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": str(CORPUS)}, "num_samples": 4, "seq_len": 64},
        "score": {"type": "score", "units": "width", "criteria": ["flap"]},
        "prune": {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.15, "allocation": "global",
                  "compensation": "bias"},
        "export": {"type": "export"},
    },
}


def test_prune_in_memory_matches_the_cli_run(tmp_path):
    """The same recipe through ``prunelab run`` (the CLI, a YAML file) and through ``prunelab.prune`` on the model
    loaded in memory: the same plan.json, and the exported model's logits equal the in-memory pruned model's within
    the float32 reload bound the export stage itself enforces (1e-5; both pruned the same weights the same way)."""
    import yaml

    from prunelab.cli import main
    from prunelab.stages.io.config import ModelConfig
    from prunelab.stages.io.models import load_model

    recipe = tmp_path / "width.yaml"
    recipe.write_text(yaml.safe_dump(WIDTH_RECIPE, sort_keys=False))
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    run_dir = tmp_path / "runs" / "api-width"
    cli_plan = json.loads((run_dir / "04-prune" / "plan.json").read_text())

    model, tok = load_model(ModelConfig(source="tiny-random-llama"))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    stages = WIDTH_RECIPE["stages"]
    result = prunelab.prune(model, tok, calibration=CORPUS.read_text(encoding="utf-8"), units="width", criterion="flap",
                            ratio=0.15, allocation="global", compensation="bias", num_samples=4, seq_len=64, seed=0,
                            score={"criteria": stages["score"]["criteria"]})
    assert result.model is model and any(not torch.equal(dense[k], v) for k, v in model.state_dict().items() if k in dense)
    assert result.plan.to_json() == cli_plan
    torch.testing.assert_close(result.calibration, torch.load(run_dir / "02-calibrate" / "calibration.pt"), rtol=0, atol=0)

    exported = prunelab.load(run_dir)
    ids = torch.arange(3, 3 + 40).unsqueeze(0)
    with torch.inference_mode():
        diff = (exported(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_calibration_forms_give_the_same_windows():
    """Text, the same text as a datasets.Dataset of one row, and the token ids those gave: one plan."""
    import datasets

    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

    text = CORPUS.read_text(encoding="utf-8")
    kw = dict(criterion="block_influence", num_blocks=2, num_samples=4, seq_len=64)
    a = prunelab.prune(tiny_llama(num_layers=6), byte_tokenizer(), calibration=text, **kw)
    b = prunelab.prune(tiny_llama(num_layers=6), byte_tokenizer(), calibration=datasets.Dataset.from_dict({"text": [text]}), **kw)
    c = prunelab.prune(tiny_llama(num_layers=6), None, calibration=a.calibration, **kw)
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.calibration, c.calibration)
    assert a.plan.to_json() == b.plan.to_json() == c.plan.to_json()
    assert a.scores["block_influence"]["scores"] == c.scores["block_influence"]["scores"]


def test_prune_refuses_bad_input_before_work():
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

    model = tiny_llama(num_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"stages\.prune.*block_influense"):
        prunelab.prune(model, byte_tokenizer(), calibration="some text", criterion="block_influense", num_blocks=1)
    with pytest.raises(RecipeError, match=r"stages\.prune\.num_blokcs"):
        prunelab.prune(model, byte_tokenizer(), calibration="some text", criterion="magnitude", num_blokcs=1)
    with pytest.raises(ValueError, match=r"vocab_size"):
        prunelab.prune(model, None, calibration=torch.full((2, 8), 10_000), criterion="magnitude", num_blocks=1)
    with pytest.raises(ValueError, match=r"2-D integer"):
        prunelab.prune(model, None, calibration=torch.zeros(8), criterion="magnitude", num_blocks=1)
    with pytest.raises(ValueError, match=r"tokenizer"):
        prunelab.prune(model, None, calibration="text needs a tokenizer", criterion="magnitude", num_blocks=1)
    with pytest.raises(ValueError, match=r"no column 'text'.*text_field"):
        import datasets

        prunelab.prune(model, byte_tokenizer(), calibration=datasets.Dataset.from_dict({"body": ["x"]}),
                       criterion="magnitude", num_blocks=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_run_by_name_dict_and_overrides(tmp_path):
    """A shipped recipe by name with overrides, and errors for an unknown name (with the close match) and bad keys."""
    metrics = prunelab.run("debug", {"stages.prune.num_blocks": 1, "stages.score.criteria": ["magnitude"],
                                     "stages.prune.criterion": "magnitude"}, output_dir=tmp_path)
    assert metrics["model"]["layers_after"] == 5 and (tmp_path / "debug" / "model" / "config.json").is_file()
    again = prunelab.run("debug", ["stages.prune.num_blocks=1", "stages.score.criteria=[magnitude]",
                                   "stages.prune.criterion=magnitude"], output_dir=tmp_path, resume=True)
    assert again["plan"] == metrics["plan"] and again["eval"] == metrics["eval"]  # resumed: every stage restored
    with pytest.raises(RecipeError, match="did you mean 'debug'"):
        prunelab.run("debgu", output_dir=tmp_path)
    with pytest.raises(RecipeError, match="num_blokcs"):
        prunelab.load_recipe("debug", {"stages.prune.num_blokcs": 1})
    with pytest.raises(ValueError, match="contradict"):
        prunelab.run("debug", resume=True, force=True)


def test_load_any_export(tmp_path):
    """A model folder and its run directory; per-layer widths come back; a folder that is neither is refused."""
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

    result = prunelab.prune(tiny_llama(num_layers=4), byte_tokenizer(), calibration=CORPUS.read_text(encoding="utf-8"),
                            units="width", criterion="flap", ratio=0.2, allocation="global", num_samples=2, seq_len=32)
    (tmp_path / "run" / "model").mkdir(parents=True)
    result.model.save_pretrained(tmp_path / "run" / "model")
    byte_tokenizer().save_pretrained(tmp_path / "run" / "model")
    ids = torch.arange(3, 30).unsqueeze(0)
    for path in (tmp_path / "run", tmp_path / "run" / "model"):
        model, tok = prunelab.load(path, tokenizer=True)
        with torch.inference_mode():
            assert (model(ids).logits - result.model(ids).logits).abs().max().item() <= 1e-5
        assert tok is not None
    with pytest.raises(FileNotFoundError, match="not a prunelab export"):
        prunelab.load(tmp_path)
