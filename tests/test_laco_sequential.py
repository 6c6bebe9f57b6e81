"""LaCo through the sequential pipeline (issue 28 item 2): the trials from the cached dense boundary states, one block
resident, give the plan and the similarities of ``full``; a LaCo plan is exported block by block (merged blocks from
their sources) exactly as a resident run exports it.

Settings are chosen so that trials are rejected, two or more merges are kept and a later merge absorbs an earlier
merged block (the nested case, where a merged block must be read back). The similarity floor is measured here: how
far ``full`` in float32 is from ``full`` in float64 on the same model and calibration (sequential and full are each
within about one floor of the exact value, so they may differ by twice it; at least two float32 epsilons). Measured on
the dev CPU: sequential == full exactly (0.0), float64 floor ~1e-7.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import prunelab
from prunelab.stages.calibration.needs import refusals
from prunelab.stages.calibration.pipelines import SequentialPipeline
from prunelab.stages.calibration.stats import CalibrationStats
from prunelab.stages.criteria import laco as laco_module
from prunelab.stages.criteria.base import CriterionInputs
from prunelab.stages.criteria.laco import laco
from prunelab.stages.criteria.settings import LacoSettings
from prunelab.stages.io.tiny import byte_tokenizer, tiny_family, tiny_llama
from prunelab.stages.surgery.merge import assigned, rdsc_merge, rdsc_state

ROOT = Path(__file__).resolve().parents[1]
CORPUS = str(ROOT / "tests" / "data" / "tiny_corpus.txt")
EPS = 2 * torch.finfo(torch.float32).eps

# family → (model, LaCo settings, layers to remove); each gives rejected trials, ≥ 2 kept merges, a nested merge
CASES: dict[str, tuple[Any, dict[str, Any], int]] = {
    "llama": (lambda: tiny_llama(num_layers=10), {"merge_layers": 3, "interval": 1, "threshold": 0.33}, 4),
    "qwen2": (lambda: tiny_family("qwen2", num_layers=8), {"merge_layers": 2, "interval": 1, "threshold": 0.4}, 4),
}


def _calibration() -> torch.Tensor:
    return torch.randint(3, 259, (6, 16), generator=torch.Generator().manual_seed(0))


def _run(model: torch.nn.Module, opts: dict[str, Any], num_remove: int, pipeline: Any = None) -> dict[str, Any]:
    stats = CalibrationStats(num_blocks=len(model.model.layers))
    inp = CriterionInputs(model, stats, 0, LacoSettings(**opts), _calibration(), 2, num_remove, progress=False,
                          pipeline=pipeline)
    return laco(inp).extra


def _path(extra: dict[str, Any]) -> list[tuple[int, list[int], bool]]:
    return [(t["into"], t["from"], t["kept"]) for t in extra["trials"]]


def _within_floor(got: dict[str, Any], full: dict[str, Any], exact: dict[str, Any]) -> None:
    """Every trial's similarity within twice the floor: full float32 vs full float64 (at least 2 float32 eps)."""
    floor = max(max(abs(a["similarity"] - b["similarity"]) for a, b in zip(full["trials"], exact["trials"])), EPS)
    for a, b in zip(got["trials"], full["trials"]):
        assert abs(a["similarity"] - b["similarity"]) <= 2 * floor, (a, b, floor)


@functools.cache
def _reference(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The model, its tensors before any trial, and ``full``'s trials in float32 and float64 (shared by the cases)."""
    build, opts, num_remove = CASES[family]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, before, _run(model, opts, num_remove), _run(copy.deepcopy(model).double(), opts, num_remove)


@pytest.mark.parametrize("every", [1, 3, None], ids=["every-1", "every-3", "every-default"])
@pytest.mark.parametrize("budget", [0.0, 4.0], ids=["offloaded", "in-memory"])
@pytest.mark.parametrize("family", list(CASES))
def test_sequential_trials_equal_full(family: str, budget: float, every: int | None) -> None:
    _, opts, num_remove = CASES[family]
    model, before, full, exact = _reference(family)
    seq = _run(model, opts, num_remove, SequentialPipeline(memory_budget_gb=budget, checkpoint_every=every))
    # the settings exercise what the sequential form must get right
    assert any(not t["kept"] for t in full["trials"]) and len(full["merges"]) >= 2
    merged_then_absorbed = [m for m in full["merges"] if any(m["into"] in later["from"] for later in full["merges"])]
    assert merged_then_absorbed, "no kept merge absorbs an earlier merged block"
    assert _path(seq) == _path(full) == _path(exact)
    assert [(m["into"], m["from"]) for m in seq["merges"]] == [(m["into"], m["from"]) for m in full["merges"]]
    _within_floor(seq, full, exact)
    for k, v in model.state_dict().items():  # neither form left a merge in the model
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("family", list(CASES))
def test_checkpointed_dense_states_stored_and_recomputed(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With k > 1 fewer than L + 1 dense boundaries are held at once (at most ⌈S/k⌉ checkpoints + k − 1 recomputed, S
    the positions a trial can start at), and each block below the top start is run at most once more per batch than
    with every boundary kept (a segment recomputed once, not once per trial inside it)."""
    from prunelab.stages.arch.base import ArchAdapter

    _, opts, num_remove = CASES[family]
    model, _, full, _ = _reference(family)
    n, batches = len(model.model.layers), -(-_calibration().shape[0] // 2)
    starts = n - 1 - opts["merge_layers"] + 1  # trials start at 0 … H − C (layers: all)
    engines: list[Any] = []
    forwards = [0]
    engine_class, run_block = laco_module._SequentialTrials, ArchAdapter.run_block

    def spy_engine(*args: Any) -> Any:
        engines.append(engine_class(*args))
        return engines[-1]

    def spy_block(self: Any, index: int, hidden: Any, inputs: Any) -> Any:
        forwards[0] += 1
        return run_block(self, index, hidden, inputs)

    monkeypatch.setattr(laco_module, "_SequentialTrials", spy_engine)
    monkeypatch.setattr(ArchAdapter, "run_block", spy_block)
    stored, runs = {}, {}
    for every in (1, 3):
        forwards[0] = 0
        extra = _run(model, opts, num_remove, SequentialPipeline(memory_budget_gb=0, checkpoint_every=every))
        assert _path(extra) == _path(full)
        stored[every], runs[every] = engines[-1].most_stored, forwards[0]
    assert stored[1] == starts  # every position a trial can start at
    assert stored[3] <= -(-starts // 3) + 3 - 1 and stored[3] < stored[1] < n + 1, stored
    assert 0 < runs[3] - runs[1] <= (starts - -(-starts // 3)) * batches, runs  # one recompute per segment block


def test_no_copy_of_the_model_or_of_a_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's trials once deep-copied the whole model (and a block per trial); both forms now assign merged tensors."""
    build, opts, num_remove = CASES["llama"]
    model = build()
    copied: list[str] = []
    original = copy.deepcopy

    def spy(obj: Any, memo: Any = None) -> Any:
        copied.append(type(obj).__name__)
        return original(obj, memo)

    monkeypatch.setattr(laco_module.copy, "deepcopy", spy)
    _run(model, opts, num_remove)
    _run(model, opts, num_remove, SequentialPipeline())
    assert not [c for c in copied if c.endswith(("ForCausalLM", "DecoderLayer", "Model"))], copied


def test_rdsc_state_is_rdsc_merge_and_assigned_puts_everything_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunelab.stages.surgery import merge

    monkeypatch.setattr(merge, "CHUNK", 7)  # many float64 chunks per tensor: the same bits as one pass
    model = tiny_family("qwen2", num_layers=4)  # biases merge too
    layers = model.model.layers
    before = copy.deepcopy(layers[1])
    state = rdsc_state(layers[1], [layers[2], layers[3]])
    assert all(torch.equal(a, b) for a, b in zip(before.parameters(), layers[1].parameters()))  # base untouched
    rdsc_merge(before, [layers[2], layers[3]])
    want = before.state_dict()
    assert state.keys() == want.keys()
    for k in want:
        assert torch.equal(state[k], want[k]), k
    bias = "self_attn.q_proj.bias"
    for key in (bias, "mlp.down_proj.weight"):  # the paper's formula in one float64 pass
        manual = layers[1].state_dict()[key].double()
        manual = manual + sum(layers[j].state_dict()[key].double() - manual for j in (2, 3))
        assert torch.equal(state[key], manual.float()), key
    params = list(layers[1].parameters())
    with assigned(layers[1], state):
        assert torch.equal(layers[1].self_attn.q_proj.bias, state[bias])
    assert all(a is b for a, b in zip(params, layers[1].parameters()))  # the same tensors, not copies


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama (untied) and Qwen2 (biases) saved in several safetensors shards, with a tokenizer."""
    out = {}
    models = {"llama": tiny_llama(num_layers=10, tie=False), "qwen2": tiny_family("qwen2", num_layers=8)}
    for family, model in models.items():
        folder = tmp_path_factory.mktemp(family) / "model"
        model.save_pretrained(folder, max_shard_size="150KB")
        byte_tokenizer().save_pretrained(folder)
        out[family] = folder
    return out


def _recipe(source: Path, load: str, pipeline: str, threshold: float, num_blocks: int) -> dict[str, Any]:
    return {"name": f"laco-{load}-{pipeline}", "model": {"source": str(source), "load": load}, "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": CORPUS}, "num_samples": 6, "seq_len": 32,
                      "pipeline": {"type": pipeline, **({"memory_budget_gb": 0} if pipeline == "sequential" else {})}},
        "score": {"type": "score", "criteria": ["laco"],
                  "settings": {"laco": {"merge_layers": 3, "threshold": threshold}}},
        "prune": {"type": "prune", "criterion": "laco", "num_blocks": num_blocks},
        "export": {"type": "export", "shard_mb": 0.2}}}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(("family", "threshold", "num_blocks"), [("llama", 0.2, 4), ("qwen2", 0.2, 2)])
def test_streamed_laco_run_equals_resident(folders: dict[str, Path], tmp_path: Path, family: str, threshold: float,
                                           num_blocks: int) -> None:
    """``load: streaming`` (meta skeleton, trials and export block by block) against ``load: resident`` +
    ``pipeline: full``: the same trials, plan and exported tensors; the export reloads in vanilla transformers."""
    from transformers import AutoModelForCausalLM

    source = folders[family]
    runs = {}
    for load, pipeline in (("resident", "full"), ("streaming", "sequential")):
        result = prunelab.run(_recipe(source, load, pipeline, threshold, num_blocks), output_dir=tmp_path)
        run = tmp_path / f"laco-{load}-{pipeline}"
        runs[load] = {"result": result, "dir": run,
                      "scores": json.loads(next(run.glob("*-score/scores.json")).read_text())["laco"],
                      "plan": json.loads(next(run.glob("*-prune/plan.json")).read_text())}
    res, st = runs["resident"], runs["streaming"]
    assert _path(st["scores"]) == _path(res["scores"])  # similarities: the floor-bounded tests above
    for key in ("merges", "removed_blocks"):
        assert st["plan"][key] == res["plan"][key], key
    assert len(st["plan"]["merges"]) >= 1
    if family == "llama":  # a merged block absorbed by a later merge: the export reads it back
        merges = st["plan"]["merges"]
        assert any(m["into"] in later["from"] for m in merges for later in merges)
    assert st["result"]["model"]["params_after"] == res["result"]["model"]["params_after"]
    a, b = res["dir"] / "model", st["dir"] / "model"
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(tb[name], ta[name], rtol=1e-5, atol=1e-6, msg=name)
    assert len(json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]) == len(tb)
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        got = AutoModelForCausalLM.from_pretrained(b).eval()(ids).logits
        want = AutoModelForCausalLM.from_pretrained(a).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_streamed_trials_hold_the_merge_sources_then_one_block(folders: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On a meta skeleton: at most C blocks resident while a merge is summed, exactly one during every forward; the
    trials (some rejected) those of ``full`` on the same weights loaded whole."""
    from prunelab.stages.arch.base import ArchAdapter
    from prunelab.stages.calibration.streamed import load_streaming
    from prunelab.stages.io.config import ModelConfig

    model, _ = load_streaming(ModelConfig(source=str(folders["llama"]), load="streaming"))
    layers = model.model.layers

    def resident() -> int:
        return sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers)

    seen: dict[str, list[int]] = {"merge": [], "forward": []}
    state_fn, run_block = laco_module.rdsc_state, ArchAdapter.run_block

    def merge_spy(base: Any, others: Any) -> Any:
        seen["merge"].append(resident())
        return state_fn(base, others)

    def block_spy(self: Any, index: int, hidden: Any, inputs: Any) -> Any:
        seen["forward"].append(resident())
        return run_block(self, index, hidden, inputs)

    monkeypatch.setattr(laco_module, "rdsc_state", merge_spy)
    monkeypatch.setattr(ArchAdapter, "run_block", block_spy)
    _, opts, num_remove = CASES["llama"]
    extra = _run(model, opts, num_remove, SequentialPipeline(memory_budget_gb=0))
    assert seen["merge"] and max(seen["merge"]) <= opts["merge_layers"]
    assert seen["forward"] and set(seen["forward"]) == {1}
    assert resident() == 0  # every block back on meta
    monkeypatch.undo()
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(folders["llama"]).eval()  # the same weights
    full, exact = _run(whole, opts, num_remove), _run(whole.double(), opts, num_remove)
    assert any(not t["kept"] for t in full["trials"]) and len(full["merges"]) >= 2
    assert _path(extra) == _path(full) == _path(exact)
    _within_floor(extra, full, exact)


def test_laco_is_accepted_by_the_sequential_pipeline_and_streaming_at_dry_run(folders: dict[str, Path],
                                                                               tmp_path: Path, capsys) -> None:
    from prunelab.run import main

    recipe = tmp_path / "laco.json"
    recipe.write_text(json.dumps(_recipe(folders["llama"], "streaming", "sequential", 0.2, 4)))
    assert main([str(recipe), "--dry-run", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "cannot collect" not in out.out + out.err
    assert refusals("sequential", {"merge_trials"}) == {}
    # the need LaCo used to share is served too (the sublayer removals block-wise: tests/test_sublayer_sequential.py)
    assert refusals("sequential", {"calibration"}) == {}


def test_laco_only_streamed_score_makes_no_calibration_pass(folders: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """LaCo's need ``merge_trials`` is a marker that collects nothing, so a streamed score stage with LaCo alone reads
    no block for a calibration pass: the score stage's block loads are exactly those of LaCo's own dense pass and
    trials. The same count with a need that collects (``boundary``) adds one pass: L more loads."""
    from prunelab.stages.calibration.sequential import SafetensorsWeights
    from prunelab.stages.calibration.streamed import load_streaming
    from prunelab.stages.criteria.scoring import needs_for, score_criteria
    from prunelab.stages.io.config import ModelConfig

    model, _ = load_streaming(ModelConfig(source=str(folders["llama"]), load="streaming"))
    n = len(model.model.layers)
    loads = [0]
    block = SafetensorsWeights.block

    def spy(self: Any, adapter: Any, index: int) -> Any:
        loads[0] += 1
        return block(self, adapter, index)

    monkeypatch.setattr(SafetensorsWeights, "block", spy)
    _, opts, num_remove = CASES["llama"]
    pipeline = SequentialPipeline(memory_budget_gb=0)
    alone = _run(model, opts, num_remove, pipeline)
    laco_alone = loads[0]

    def scored(extra: set[str]) -> tuple[dict[str, Any], Any, int]:
        loads[0] = 0
        results, stats = score_criteria("depth", ["laco"], model, _calibration(), settings={"laco": LacoSettings(**opts)},
                                        batch_size=2, extra_needs=extra, num_remove=lambda: num_remove, progress=False,
                                        pipeline=pipeline)
        return results, stats, loads[0]

    assert needs_for("depth", ["laco"]) == {"merge_trials"}
    results, stats, score_stage = scored(set())
    assert score_stage == laco_alone and stats.seconds == 0.0
    assert _path(results["laco"]) == _path(alone)  # the extra sits at the top of the saved result
    _, _, with_pass = scored({"boundary"})
    assert with_pass == laco_alone + n  # the counter sees a pass when one is made


@pytest.mark.slow
def test_smollm2_sequential_laco_equals_full() -> None:
    """SmolLM2-135M (GGUF source, so resident), 4 × 128 tokens of WikiText-2 valid, the laco-20 recipe's settings but
    T = 0.7 and 4 layers: two trials rejected, four merges kept, three of them absorbing a merged block. Measured on
    the dev CPU: the same trials, similarities equal to full's exactly (float64 floor 1.2e-7); full 27 s, sequential
    9 s (a trial runs only the blocks above its base)."""
    shared = ROOT.parent / "shared" / "data" / "wikitext2" / "valid.txt"
    if not shared.is_file():
        pytest.skip("needs ../shared/data")
    from prunelab.recipe import ModelConfig
    from prunelab.stages.io.models import load_model

    model, tok = load_model(ModelConfig(source="smollm2-135m"))
    ids = tok(shared.read_text()[:20000], return_tensors="pt").input_ids[:, :512].reshape(4, 128)
    opts = {"merge_layers": 2, "layers": (2, 27), "interval": 1, "threshold": 0.7}

    def run(m: torch.nn.Module, pipeline: Any = None) -> dict[str, Any]:
        inp = CriterionInputs(m, CalibrationStats(num_blocks=30), 0, LacoSettings(**opts), ids, 2, 4, progress=False,
                              pipeline=pipeline)
        return laco(inp).extra

    full = run(model)
    seq = run(model, SequentialPipeline(memory_budget_gb=0.001))  # most boundary states memory-mapped
    exact = run(copy.deepcopy(model).double())
    assert any(not t["kept"] for t in full["trials"]) and len(full["merges"]) == 4
    assert _path(seq) == _path(full) == _path(exact)
    _within_floor(seq, full, exact)
