"""Models and data online and offline (issue 26 item 4), with no network: every Hub and `datasets` call is a stand-in.

- ``--dry-run`` with a hub id, online: the download size from the Hub's file list and a memory estimate (the formula
  of ``prunelab.stages.io.footprint``); offline and not cached: refused at ``--dry-run`` and at a real run with the fix
  (a local path, ``hf download``, ``HF_HUB_OFFLINE``), leaving no run directory; offline and cached: the cache is read.
- WikiText-2 and ARC by name (``{dataset: wikitext2 | arc-easy, split: …}``): the local file first, else ``datasets``;
  offline and absent: refused before a model loads. Calibration and recovery never read test text.
- A failed model load leaves a run directory that ``--resume`` continues.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from prunelab.run import main
from prunelab.stages.io import footprint, hub, named_data

ROOT = Path(__file__).resolve().parents[1]
LLAMA_7B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
            "torch_dtype": "float16"}
P_7B = 6_738_415_616  # sum(p.numel()) of Llama-2-7B / llama-7b


def _call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


def _recipe(tmp_path: Path, edit) -> str:
    raw = yaml.safe_load((ROOT / "recipes/debug.yaml").read_text())
    edit(raw)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Not offline, an empty Hugging Face cache, and a hub that answers the connect check."""
    import huggingface_hub.constants as hc

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(hub, "hub_unreachable", lambda timeout=1.0: None)
    went = []
    monkeypatch.setattr(hub, "go_offline", lambda: went.append(True))
    return went


@pytest.fixture
def unreachable(online, monkeypatch):
    """The same, but the hub's host does not answer (as on a machine without a network)."""
    monkeypatch.setattr(hub, "hub_unreachable", lambda timeout=1.0: "huggingface.co:443: Name or service not known")
    return online


class FakeApi:
    """``HfApi`` as far as the dry run uses it: a sharded Llama-7B repository with files it does not download."""

    calls: list[tuple[str, dict]] = []

    def model_info(self, repo_id, **kw):
        FakeApi.calls.append((repo_id, kw))
        files = {"model-00001-of-00002.safetensors": 9_976_576_152, "model-00002-of-00002.safetensors": 3_500_296_424,
                 "model.safetensors.index.json": 26_788, "config.json": 609, "tokenizer.json": 1_842_767,
                 "tokenizer_config.json": 1_618, "consolidated.safetensors": 13_476_839_424,
                 "original/consolidated.00.pth": 13_476_925_163, "README.md": 22_000}
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=k, size=v) for k, v in files.items()])


# ----------------------------------------------------------------------------- the download and the memory


def test_weight_files_are_what_from_pretrained_fetches():
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
             "consolidated.safetensors", "original/params.json", "config.json", "tokenizer.json", "README.md"]
    assert footprint.weight_files(names) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                             "model.safetensors.index.json", "config.json", "tokenizer.json"]
    assert footprint.weight_files(["pytorch_model.bin", "config.json", "flax_model.msgpack"]) == ["pytorch_model.bin", "config.json"]
    assert footprint.weight_files(["a.Q4_0.gguf", "a.Q8_0.gguf", "config.json"], "a.Q8_0.gguf") == ["a.Q8_0.gguf", "config.json"]


def test_dry_run_online_states_the_download_and_the_memory(online, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(footprint, "_hub_config", lambda repo, revision, timeout: dict(LLAMA_7B))
    FakeApi.calls.clear()
    rc, out, err = _call(capsys, "recipes/debug.yaml", "model.source=some-org/llama-7b", "model.dtype=bfloat16",
                         "--dry-run")
    assert rc == 0, err
    assert FakeApi.calls == [("some-org/llama-7b", {"revision": None, "files_metadata": True, "timeout": footprint.HUB_DEADLINE})]
    total = 9_976_576_152 + 3_500_296_424 + 26_788 + 609 + 1_842_767 + 1_618  # no consolidated/, original/, README
    assert f"download: {total / 1e9:.2f} GB to download from the Hub (6 files, weights 13.48 GB)" in out, out
    assert f"{P_7B / 1e6:,.1f}M params × 2 B, bfloat16" in out and "weights 12.6 GiB" in out, out
    assert "memory (estimate; docs/data.md): ≈" in out and "at the peak" in out


def test_a_slow_hub_costs_the_deadline_not_a_minute(monkeypatch):
    import threading

    release = threading.Event()

    class Slow:
        def model_info(self, repo_id, **kw):
            release.wait(30)
            raise AssertionError("never answered in time")

    try:
        why = footprint.hub_download("org/x", None, None, api=Slow(), deadline=0.2)
    finally:
        release.set()
    assert why == "the Hub did not list the files within 0.2 s"


def test_memory_formula_by_hand_and_lora_count_equals_peft():
    """The estimate is the docstring's formula: weights P·b, a teacher copy when distilling, the largest stage; the
    LoRA term counts exactly the adapter parameters peft creates on the same model."""
    from peft import LoraConfig, get_peft_model

    from prunelab.recipe import load_recipe
    from prunelab.stages.io.sources import TINY_SHAPES
    from prunelab.stages.io.tiny import tiny_alias

    recipe = load_recipe("recipes/debug-recover.yaml")
    shape = TINY_SHAPES["tiny-random-llama"]
    est = footprint.memory_estimate(shape, recipe)
    P = shape.param_counts()[0]
    assert (est.params, est.weights, est.teacher) == (P, P * 4, 0)
    size, what = est.stages["recover"]
    T = int(what.split(": ")[1].split(" trainable")[0].replace(",", ""))
    peft = get_peft_model(tiny_alias("tiny-random-llama"), LoraConfig(r=8, target_modules=list(recipe.stages["recover"].lora.target_modules)))
    assert T == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    h, V, n, a, B, L = shape.hidden, shape.vocab, shape.num_layers, shape.heads, 2, 64
    backward = int(n * B * L * h * (34 + 5 * a * L / h) * 4 / 2) + 2 * B * L * V * 4
    assert size == T * 16 + footprint.TRAIN_FACTOR * backward
    assert est.peak == est.weights + max(v for v, _ in est.stages.values())
    kd = load_recipe("recipes/debug-recover.yaml", ["stages.recover.loss.type=kd"])
    assert footprint.memory_estimate(shape, kd).teacher == P * 4  # the dense teacher beside the student
    # a gradient criterion holds gradients and scores beside the weights: ≥ 2 × the weights
    taylor = load_recipe("recipes/debug.yaml", ["stages.score.criteria=[taylor_plus]", "stages.prune.criterion=taylor_plus"])
    grad_stage = footprint.memory_estimate(shape, taylor).stages["score"][0]
    plain = footprint.memory_estimate(shape, load_recipe("recipes/debug.yaml", ["stages.score.criteria=[ppl]"]))
    assert grad_stage >= 2 * P * 4 > plain.stages["score"][0]
    from prunelab.preflight import needs_grad  # the registry's answer, which the CLI passes in

    assert needs_grad(["block_influence", "taylor_plus"]) and not needs_grad(["ppl", "block_influence", "magnitude"])


def test_memory_estimate_of_models_larger_than_memory(tmp_path):
    """load: streaming holds one block or the embedding, load: offload its budget, the sequential pipeline adds the
    boundary states (up to its budget) — what --dry-run prints instead of the whole model's P·b."""
    import yaml

    from prunelab.recipe import load_recipe
    from prunelab.stages.io.sources import TINY_SHAPES
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    shape = TINY_SHAPES["tiny-random-llama"]
    P, block = shape.param_counts()
    h, V = shape.hidden, shape.vocab

    def recipe(budget: float | None, model: dict | None = None, keep: tuple[str, ...] | None = None):
        raw = yaml.safe_load(open("recipes/debug-sequential.yaml").read())
        if budget is None:
            raw["stages"]["calibrate"].pop("pipeline")
        else:
            raw["stages"]["calibrate"]["pipeline"] = {"type": "sequential", "memory_budget_gb": budget}
        if model is not None:
            raw["model"] = model
        if keep is not None:
            raw["stages"] = {k: v for k, v in raw["stages"].items() if k in keep}
            if model and model.get("load") == "streaming":
                raw["stages"]["export"] = {"type": "export"}
        path = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_recipe(str(path))

    full = footprint.memory_estimate(shape, recipe(None))
    resident = footprint.memory_estimate(shape, recipe(1.0))
    capped = footprint.memory_estimate(shape, recipe(0.0))
    calib = recipe(1.0).stages["calibrate"]
    boundary = 2 * calib.num_samples * calib.seq_len * h * 4
    assert resident.weights == full.weights == P * 4
    assert resident.stages["score_depth"][0] == full.stages["score_depth"][0] + boundary  # the budget holds them all
    assert "boundary states" in resident.stages["score_depth"][1]
    assert capped.stages["score_depth"][0] == full.stages["score_depth"][0]  # budget 0: every one on disk
    streamed = footprint.memory_estimate(shape, recipe(1.0, {"source": str(folder), "load": "streaming"},
                                                       ("calibrate", "score_depth", "score_width", "prune_width")))
    assert streamed.weights == (block + V * h) * 4 < P * 4
    offload = footprint.memory_estimate(shape, recipe(None, {"source": str(folder), "load": "offload",
                                                             "memory_budget_gb": 0.0001}, ("eval_pruned",)))
    assert offload.weights == int(0.0001 * footprint.GIB) < P * 4
    assert "in memory at once" in footprint.memory_line(offload)


def test_local_folder_reads_sizes_on_disk(tmp_path, capsys):
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    rc, out, err = _call(capsys, "recipes/debug.yaml", f"model.source={folder}", "--dry-run")
    assert rc == 0, err
    size = sum((folder / n).stat().st_size for n in footprint.weight_files([p.name for p in folder.iterdir()]))
    assert f"download: none: local files, {footprint.size_text(size)}" in out and "memory (estimate" in out, out


# ----------------------------------------------------------------------------- a hub id offline


def test_not_cached_and_unreachable_is_refused_at_dry_run_and_real_run(unreachable, tmp_path, capsys):
    for extra in (["--dry-run"], ["--output-dir", str(tmp_path / "runs")]):
        rc, out, err = _call(capsys, "recipes/debug.yaml", "model.source=some-org/not-cached", *extra)
        assert rc == 2, err
        assert "not in the local Hugging Face cache and the hub cannot be reached" in err, err
        assert "hf download some-org/not-cached" in err and "HF_HUB_OFFLINE" in err and "local folder path" in err
    assert not (tmp_path / "runs").exists()  # refused before any run directory is made


def _hub_cache_with_tiny(cache: Path, repo: str) -> Path:
    """A tiny Llama laid out as huggingface_hub caches a download (refs/main → snapshots/<sha>/)."""
    from prunelab.stages.io.tiny import byte_tokenizer, tiny_llama

    sha = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / sha
    tiny_llama().save_pretrained(snap)
    byte_tokenizer().save_pretrained(snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)
    return snap


def test_cached_and_unreachable_reads_the_cache(unreachable, tmp_path, capsys):
    import huggingface_hub.constants as hc

    _hub_cache_with_tiny(Path(hc.HF_HUB_CACHE), "some-org/tiny")
    rc, out, err = _call(capsys, "recipes/debug.yaml", "model.source=some-org/tiny", "--dry-run")
    assert rc == 0, err
    assert "download: none: some-org/tiny is in the Hugging Face cache" in out, out
    assert unreachable == [True]  # the process went offline: the load reads the cache without a minute of retries
    rc, out, err = _call(capsys, "recipes/debug.yaml", "model.source=some-org/tiny", "--output-dir", str(tmp_path / "runs"),
                         "--no-progress")
    assert rc == 0, err
    assert "loaded some-org/tiny" in (tmp_path / "runs" / "debug" / "run.log").read_text()


# ----------------------------------------------------------------------------- WikiText-2 and ARC by name


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """A data folder in the shared layout, and the only one searched."""
    root = tmp_path / "data"
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "test.txt").write_bytes(b" = Title = \r\n\r\n Some test text . \r\n" * 400)
    (root / "wikitext2" / "valid.txt").write_text(" = Valid = \n\n Some <unk> text . \n" * 400)
    (root / "arc").mkdir()
    rows = [{"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}, "answerKey": "B"},
            {"question": "2 + 2?", "choices": {"text": ["4", "5"], "label": ["1", "2"]}, "answerKey": "1"}]
    (root / "arc" / "arc_easy_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(named_data, "data_roots", lambda: [root])
    return root


def _source(**kw):
    from prunelab.stages.io.config import TextSource

    return TextSource(**kw)


def test_named_splits_read_the_local_files(data_root):
    from prunelab.stages.io.text import read_text

    assert read_text(_source(dataset="wikitext2", split="test")) == (" = Title = \n\n Some test text . \n" * 400)
    assert read_text(_source(dataset="wikitext2", split="valid")).startswith(" = Valid = ")
    # the older Hub spelling names the same file
    old = _source(dataset="wikitext", config="wikitext-2-raw-v1", split="test")
    assert named_data.resolve(old).local == data_root / "wikitext2" / "test.txt"
    assert read_text(_source(dataset="arc-easy", split="test")) == ("Question: Which is a gas?\nAnswer: steam\n\n"
                                                                    "Question: 2 + 2?\nAnswer: 4")


def test_a_named_split_read_from_a_local_file_is_fingerprinted_for_resume(data_root):
    """``--resume`` keys on the content of every input file: the local file a named dataset resolves to counts like
    a ``path`` (an edited copy re-runs the stages that read it); a Hub-only source names no file."""
    from prunelab.stages.core.config import input_files

    found = dict(input_files({"ppl": _source(dataset="wikitext2", split="test")}, "stages.eval"))
    assert found == {"stages.eval.ppl.resolved": str(data_root / "wikitext2" / "test.txt")}
    assert not dict(input_files(_source(dataset="some/other-set", split="train"), "src"))


def test_named_splits_without_a_local_file_come_through_datasets(data_root, monkeypatch):
    import datasets

    from prunelab.stages.io.text import read_text

    asked = []

    class Rows(list):
        column_names = ["text"]

        def __getitem__(self, key):
            return [r["text"] for r in self] if key == "text" else list.__getitem__(self, key)

    def fake_load(name, config=None, split=None, data_files=None):
        asked.append((name, config, split))
        if name == named_data.ARC:
            return [{"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A"}]
        return Rows([{"text": " a \n"}, {"text": ""}, {"text": " b \n"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert read_text(_source(dataset="wikitext2", split="train")) == " a \n\n\n\n\n b \n"
    assert read_text(_source(dataset="arc-easy", split="validation")) == "Question: Q?\nAnswer: x"
    assert asked == [("Salesforce/wikitext", "wikitext-2-raw-v1", "train"), ("allenai/ai2_arc", "ARC-Easy", "validation")]

    def offline_load(*a, **kw):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline_load)
    with pytest.raises(ValueError, match=r"fetch it once where there is a network with `python -c \"import datasets; "
                                         r"datasets.load_dataset\('Salesforce/wikitext', 'wikitext-2-raw-v1'"):
        read_text(_source(dataset="wikitext2", split="train"))


def _ppl_recipe(tmp_path: Path, source: dict) -> str:
    def edit(raw):
        raw["stages"]["eval_dense"]["perplexity"]["tiny"]["source"] = source
    return _recipe(tmp_path, edit)


def test_offline_and_absent_is_refused_before_a_model_loads(unreachable, data_root, tmp_path, capsys):
    recipe = _ppl_recipe(tmp_path, {"dataset": "wikitext2", "split": "train"})  # no local train file
    rc, _, err = _call(capsys, recipe, "--dry-run")
    assert rc == 2, err
    assert "stages.eval_dense.perplexity.tiny.source: wikitext2 train (datasets Salesforce/wikitext/wikitext-2-raw-v1/train)" in err
    assert "the hub cannot be reached" in err and "load_dataset('Salesforce/wikitext', 'wikitext-2-raw-v1', split='train')" in err
    # in the datasets cache: accepted, and the process goes offline to read it
    cached = Path(named_data.datasets_cache()) / "Salesforce___wikitext" / "wikitext-2-raw-v1" / "0.0.0" / "abc"
    cached.mkdir(parents=True)
    (cached / "dataset_info.json").write_text("{}")
    rc, _, err = _call(capsys, recipe, "--dry-run")
    assert rc == 0, err
    assert unreachable == [True]
    # a local split needs no network at all
    rc, _, err = _call(capsys, _ppl_recipe(tmp_path, {"dataset": "wikitext2", "split": "test"}), "--dry-run")
    assert rc == 0, err


def test_unknown_split_and_missing_datasets_package(online, data_root, tmp_path, capsys, monkeypatch):
    rc, _, err = _call(capsys, _ppl_recipe(tmp_path, {"dataset": "arc-easy", "split": "dev2"}), "--dry-run")
    assert rc == 2 and "tiny.source.split: dataset 'arc-easy' has no split 'dev2'" in err, err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    rc, _, err = _call(capsys, _ppl_recipe(tmp_path, {"dataset": "some-org/corpus"}), "--dry-run")
    assert rc == 2 and "`datasets` package, which is not installed; `pip install datasets`" in err, err


@pytest.mark.parametrize(("where", "source"), [
    ("calibrate", {"dataset": "wikitext2", "split": "test"}),
    ("calibrate", {"path": "../shared/data/wikitext2/test.txt"}),
    ("calibrate", {"mix": [{"source": {"path": "tests/data/tiny_corpus.txt"}, "weight": 1},
                           {"source": {"qa_text": "../shared/data/arc/arc_easy_test.jsonl"}, "weight": 1}]}),
    ("recover", {"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "test[:50%]"}),
    ("recover", {"dataset": "text", "data_files": ["tests/data/tiny_corpus.txt", "my_test.txt"]}),
], ids=["named-test", "test-file", "mix-part", "recovery-hub-test", "recovery-data-files"])
def test_calibration_and_recovery_never_read_test_text(data_root, tmp_path, capsys, where, source):
    raw = yaml.safe_load((ROOT / "recipes/debug-recover.yaml").read_text())
    if where == "calibrate":
        raw["stages"]["calibrate"]["source"] = source
    else:
        raw["stages"]["recover"]["data"]["source"] = source
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, _, err = _call(capsys, str(path), "--dry-run")
    assert rc == 2 and "is test text, and" in err and "reads valid/train text only" in err, err
    assert f"stages.{where}." in err


def test_evaluation_on_test_text_is_fine(data_root, tmp_path, capsys):
    rc, _, err = _call(capsys, _ppl_recipe(tmp_path, {"dataset": "wikitext2", "split": "test"}), "--dry-run")
    assert rc == 0, err


# ----------------------------------------------------------------------------- a failed load


def test_a_failed_load_leaves_a_run_that_resume_continues(tmp_path, capsys, monkeypatch):
    import prunelab.runner as runner

    real = runner._spec

    def fail(ctx, cfg):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(runner, "_spec", lambda t: dataclasses.replace(real(t), run=fail) if t == "load" else real(t))
    args = ["recipes/debug.yaml", "--output-dir", str(tmp_path / "runs"), "--no-progress"]
    rc, _, err = _call(capsys, *args)
    run_dir = tmp_path / "runs" / "debug"
    assert rc == 2 and "stage 01-load failed" in err and "rerun with --resume to continue from 01-load" in err, err
    assert not list(run_dir.glob("*/done.json")) and (run_dir / "run.log").is_file()
    rc, _, err = _call(capsys, *args)
    assert rc == 2 and "already exists; pass --resume to continue it" in err, err
    monkeypatch.setattr(runner, "_spec", real)
    rc, out, err = _call(capsys, *args, "--resume")
    assert rc == 0, err
    assert (run_dir / "metrics.json").is_file() and (run_dir / "07-export" / "done.json").is_file()
