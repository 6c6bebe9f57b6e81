"""The block-wise backward and SLEB's rounds in the sequential pipeline (issue 28 item 2).

Taylor criteria need ∂L/∂w of the calibration loss; ``sequential`` gets it from the head down, one block resident,
from stored boundary states. It must give the gradient sums of ``full`` — bounded by the float floor measured here:
how far ``full`` in float32 is from ``full`` in float64 on the same model (on the dev CPU the sequential sums are
bit-equal to full's, difference 0) — and therefore the same scores and plans, for every Taylor criterion, with the
model resident or streamed from safetensors, tied or untied head, dense or mixture-of-experts layers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from prunelab.stages.calibration.full import collect_stats
from prunelab.stages.calibration.pipelines import FullPipeline, SequentialPipeline
from prunelab.stages.calibration.sequential import (
    SafetensorsWeights,
    collect_from_pretrained,
    collect_sequential,
    skeleton,
)
from prunelab.stages.calibration.stats import CalibrationStats
from prunelab.stages.io.tiny import tiny_family, tiny_llama
from tests.test_sequential import numbers_in

ROOT = Path(__file__).resolve().parents[1]
TAYLOR = {"grad", "fisher", "hidden"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a| (one number per tensor: the sums span many magnitudes)."""
    return ((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-300)).item()


def _gap(a: CalibrationStats, b: CalibrationStats) -> float:
    """The largest relative difference over every gradient and squared-gradient sum (the same names required)."""
    assert list(a.grad_sum) == list(b.grad_sum) and list(a.grad_sq_sum) == list(b.grad_sq_sum)
    assert a.grad_batches == b.grad_batches
    return max(_rel(a.grad_sum[n], b.grad_sum[n]) for n in a.grad_sum) if a.grad_sum else 0.0


def _floor(model: torch.nn.Module, calib: torch.Tensor, full: CalibrationStats, batch_size: int = 2) -> float:
    """How far float32 is from float64 for ``full`` on this model and this machine: the allowed gap (Σ g)."""
    double = copy.deepcopy(model).double()
    if getattr(double.config, "_experts_implementation", None) == "grouped_mm":  # float32 / bf16 kernels only
        double.set_experts_implementation("eager")
    double = collect_stats(double, calib, {"grad", "hidden"}, batch_size, False)
    return max(max(_rel(double.grad_sum[n], full.grad_sum[n]) for n in double.grad_sum), 1e-12)


def _calib(model: torch.nn.Module, n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("tie", "every"), [(True, None), (False, None), (True, 1), (False, 3)])
def test_blockwise_gradients_equal_full_resident_and_streamed(tmp_path: Path, tie: bool, every: int | None) -> None:
    """Every parameter's Σ g and Σ g² (embedding, norms and head too: ``hidden``), with the boundary states and
    gradients all memory-mapped (budget 0), resident and streamed from sharded safetensors; the forward keeping every
    boundary (``checkpoint_every: 1``), every 2nd (the default for 5 blocks, ⌈√5⌉ = 3: x_0, x_3, x_5) or every 3rd."""
    model = tiny_llama(num_layers=5, heads=4, kv_heads=2, tie=tie, seed=2)
    model.save_pretrained(tmp_path / "model", max_shard_size="100KB")
    calib = _calib(model)
    full = collect_stats(model, calib, TAYLOR, 2, False)
    floor = _floor(model, calib, full)
    settings = SequentialPipeline(memory_budget_gb=0, offload_dir=str(tmp_path / "offload"), checkpoint_every=every)
    resident = collect_sequential(model, calib, TAYLOR, 2, False, settings)
    streamed = collect_from_pretrained(tmp_path / "model", calib, TAYLOR, 2, False, settings)
    shell, weights = skeleton(tmp_path / "model"), SafetensorsWeights(tmp_path / "model")
    collect_sequential(shell, calib, {"grad"}, 2, False, settings, weights)
    again = collect_sequential(shell, calib, TAYLOR, 2, False, settings, weights)  # a skeleton loaded before
    for seq in (resident, streamed, again):
        assert _gap(full, seq) <= floor
        assert seq.grad_sq_sum.keys() == full.grad_sq_sum.keys()
        assert max(_rel(full.grad_sq_sum[n], seq.grad_sq_sum[n]) for n in full.grad_sq_sum) <= 2 * floor
    names = set(full.grad_sum)
    assert "model.embed_tokens.weight" in names and ("lm_head.weight" in names) != tie  # one matrix when tied
    assert resident.offloaded_bytes > 0 and list((tmp_path / "offload").iterdir()) == []


def test_blockwise_gradients_of_mixture_of_experts_layers() -> None:
    model = tiny_family("qwen2_moe")
    calib = _calib(model, 4, 1)
    full = collect_stats(model, calib, TAYLOR, 2, False)
    seq = collect_sequential(model, calib, TAYLOR, 2, False)
    assert any("expert" in n for n in full.grad_sum)
    assert _gap(full, seq) <= _floor(model, calib, full)


def _boundary(model: torch.nn.Module, calib: torch.Tensor) -> int:
    """Bytes of one boundary of float32 states (or gradients) over every calibration window."""
    return calib.numel() * model.config.hidden_size * 4


@pytest.mark.parametrize(("every", "boundaries"), [
    (1, 19),  # x_0 … x_16 (x_16 kept for the tied head's share of the embedding gradient), two of gradients
    (None, 10),  # ⌈√16⌉ = 4: x_0, x_4, x_8, x_12, x_16, the recomputed x_13 … x_15, two of gradients
    (8, 12),  # x_0, x_8, x_16 and the recomputed x_9 … x_15 (7), two of gradients
])
def test_checkpoints_bound_the_stored_boundaries(every: int | None, boundaries: int) -> None:
    """16 blocks, tied head, ``hidden`` gradients, budget 0 (every state on disk, so ``offloaded_bytes`` is the peak
    stored) at the moment the walk reaches block 15: keeping every k-th boundary stores ⌈L/k⌉ + 1 + (k − 1) + 2
    boundaries instead of L + 3, and the gradients stay full's."""
    model = tiny_llama(num_layers=16, heads=4, kv_heads=2, tie=True, seed=5)
    calib = _calib(model, 4, 2)
    full = collect_stats(model, calib, TAYLOR, 2, False)
    seq = collect_sequential(model, calib, TAYLOR, 2, False,
                             SequentialPipeline(memory_budget_gb=0, checkpoint_every=every))
    assert seq.offloaded_bytes == boundaries * _boundary(model, calib)
    assert _gap(full, seq) <= _floor(model, calib, full)


def test_checkpoint_every_is_validated_by_name() -> None:
    from pydantic import ValidationError

    for bad, says in ((0, "checkpoint_every: 0 — keep every k-th boundary state, k >= 1"),
                      (True, "checkpoint_every"), (2.5, "checkpoint_every")):
        with pytest.raises(ValidationError, match=says):
            SequentialPipeline(checkpoint_every=bad)
    assert "checkpoint_every" not in SequentialPipeline().model_dump()  # run directories made before keep their hash
    assert SequentialPipeline(checkpoint_every=4).model_dump()["checkpoint_every"] == 4


def test_a_wrong_boundary_gradient_is_caught() -> None:
    """The comparison can fail: the head's gradient halved gives every block's sums off by far more than the floor."""
    from prunelab.stages.calibration import backward

    model = tiny_llama(num_layers=3, heads=4, kv_heads=2, tie=False)
    calib = _calib(model, 4)
    full = collect_stats(model, calib, {"grad"}, 2, False)
    original = backward.head_loss
    try:
        backward.head_loss = lambda *a: original(*a) * 0.5  # type: ignore[assignment]
        wrong = collect_sequential(model, calib, {"grad"}, 2, False)
    finally:
        backward.head_loss = original  # type: ignore[assignment]
    assert _gap(full, wrong) > 0.4


def test_router_aux_loss_is_refused_by_name() -> None:
    model = tiny_family("qwen2_moe")
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="output_router_logits"):
        collect_sequential(model, _calib(model, 2), {"grad"}, 2, False)


def test_sleb_rounds_through_the_sequential_pipeline_equal_full() -> None:
    """SLEB's later rounds: a sequential pass over the kept blocks (removed ones skipped) gives full's NLLs."""
    from prunelab.stages.criteria.base import CriterionInputs
    from prunelab.stages.criteria.depth import sleb

    model = tiny_llama(num_layers=6, heads=4, kv_heads=2, tie=True)
    calib = _calib(model, 4, 3)
    stats = collect_stats(model, calib, {"removal_nll"}, 2, False)
    out = {}
    for name, pipeline in (("full", FullPipeline()), ("sequential", SequentialPipeline(memory_budget_gb=0))):
        out[name] = sleb(CriterionInputs(model, stats, calibration=calib, batch_size=2, num_remove=3, progress=False,
                                         pipeline=pipeline))
    assert out["full"].order == out["sequential"].order
    for a, b in zip(out["full"].extra["rounds"], out["sequential"].extra["rounds"], strict=True):
        assert a["kept"] == b["kept"]
        torch.testing.assert_close(torch.tensor(b["ppl"]), torch.tensor(a["ppl"]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="only removal_nll"):
        collect_sequential(model, calib, {"boundary"}, 2, False, skip=frozenset({1}))


def _recipe(tmp_path: Path, pipeline: object, units: str, criterion: str) -> Path:
    score = {"type": "score", "criteria": ["taylor_plus", "sleb", "ppl"]} if units == "blocks" else \
        {"type": "score", "units": "width", "criteria": ["taylor", "taylor_element2", "taylor_vector"]}
    prune = {"type": "prune", "criterion": criterion, "num_blocks": 2} if units == "blocks" else \
        {"type": "prune", "units": units, "criterion": criterion, "ratio": 0.2}
    raw = {"name": "seq-taylor", "seed": 0, "model": {"source": "tiny-random-llama"},
           "stages": {"calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"},
                                    "num_samples": 4, "seq_len": 32, "pipeline": pipeline},
                      "score": score, "prune": prune}}
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize(("units", "criterion"), [("blocks", "sleb"), ("width", "taylor_vector"),
                                                ("hidden", "taylor_element2")])
def test_recipe_taylor_and_sleb_scores_and_plans_equal_full(tmp_path: Path, units: str, criterion: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole run: depth Taylor+, SLEB and PPL, or the three LLM-Pruner Taylor criteria (with their hidden-channel
    form when the prune removes hidden channels), score the same through both pipelines, and the plans agree."""
    from prunelab.run import main
    from prunelab.stages.criteria import depth

    rounds: list[frozenset[int]] = []  # SLEB's later rounds reach the sequential pipeline in a recipe run

    def spy(*args: object, skip: frozenset[int] = frozenset(), **kw: object) -> CalibrationStats:
        rounds.append(skip)
        return collect_sequential(*args, skip=skip, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(depth, "collect_sequential", spy)
    runs = {}
    for name, pipeline in (("full", "full"), ("sequential", {"type": "sequential", "memory_budget_gb": 0})):
        out = tmp_path / name
        recipe = _recipe(tmp_path, pipeline, units, criterion)
        assert main([str(recipe), "--output-dir", str(out), "--no-progress"]) == 0
        runs[name] = out / "seq-taylor"
    full, seq = ({k: {f: v for f, v in r.items() if f not in ("seconds", "rounds")} for k, r in
                  json.loads(next(run.glob("*-score/scores.json")).read_text()).items()}
                 for run in (runs["full"], runs["sequential"]))
    assert full.keys() == seq.keys()
    for name in full:
        assert full[name].keys() == seq[name].keys()
        torch.testing.assert_close(torch.tensor(numbers_in(seq[name])), torch.tensor(numbers_in(full[name])),
                                   rtol=1e-5, atol=1e-9)
    assert ("hidden" in full["taylor" if units != "blocks" else "ppl"]) == (units == "hidden")
    plans = [json.loads(next(r.glob("*-prune/plan.json")).read_text()) for r in runs.values()]
    assert plans[0] == plans[1]
    assert (len(rounds) == 1 and len(rounds[0]) == 1) if units == "blocks" else not rounds  # round 2 of 2, sequential


@pytest.mark.slow
def test_smollm2_blockwise_gradients_equal_full() -> None:
    """SmolLM2-135M (tied head, GGUF source so resident; 30 blocks): Σ g of every parameter equal to full's, every
    boundary state and gradient spilled (budget 0), with every boundary kept (x_0 … x_30 and two of gradients: 33
    stored at the peak) and with the default checkpoints (⌈√30⌉ = 6: x_0, x_6, … x_24, x_30, the recomputed x_25 …
    x_29, two of gradients: 13)."""
    shared = ROOT.parent / "shared" / "data" / "wikitext2" / "valid.txt"
    if not shared.is_file():
        pytest.skip("needs ../shared/data")
    from prunelab.recipe import ModelConfig
    from prunelab.stages.io.models import load_model

    model, tok = load_model(ModelConfig(source="smollm2-135m"))
    ids = tok(shared.read_text()[:20000], return_tensors="pt").input_ids[:, :256].reshape(2, 128)
    full = collect_stats(model, ids, TAYLOR, 1, False)
    floor = _floor(model, ids, full, batch_size=1)
    stored = {}
    for every, boundaries in ((1, 33), (None, 13)):
        seq = collect_sequential(model, ids, TAYLOR, 1, False,
                                 SequentialPipeline(memory_budget_gb=0, checkpoint_every=every))
        assert _gap(full, seq) <= floor
        assert seq.offloaded_bytes == boundaries * _boundary(model, ids)
        stored[every] = seq.offloaded_bytes
    print(f"boundary bytes stored at the peak: every boundary {stored[1]:,}, checkpoints {stored[None]:,}")
