"""sublayer_ppl and sublayer_sleb through the sequential pipeline (issue 28; stages/criteria/sublayer_blockwise.py):
one decoder layer resident, every sublayer's input states in boundary caches (here forced onto disk), the same scores
(within the float floor of tests/test_sequential_criteria.py: twice float32-vs-float64 of ``full``, at least two
float32 epsilons) and the identical plan as ``full`` — for every setting of the greedy's economies, on several
families, and on a streamed skeleton (``load: streaming``) read block by block from safetensors shards.

Measured on the dev CPU: sequential == full bit for bit (gap 0.0) in every case here: each sublayer runs on the same
batch shapes in both walks, and a state read back from disk is the float32 written."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.arch.base import ArchAdapter
from prunelab.stages.calibration.pipelines import SequentialPipeline
from prunelab.stages.calibration.sequential import BoundaryCache
from prunelab.stages.criteria import sublayer_blockwise
from prunelab.stages.criteria.scoring import score_criteria
from prunelab.stages.criteria.sublayer import SublayerSLEBSettings
from prunelab.stages.io.tiny import byte_tokenizer, tiny_family, tiny_llama
from prunelab.stages.prune import prune_config
from prunelab.stages.selection.config import SELECTIONS
from tests.test_sequential_criteria import _same_layout, check, gaps

NAMES = ["sublayer_ppl", "sublayer_sleb"]
# the greedy's economies → a target that exercises them: lazy rounds whose winner's tails are kept (min_fresh ≤ 4),
# exact rounds whose winner's states are recomputed by the next pass (every candidate in one pass: no tails),
# screening with a one-candidate lazy loop and one kind only
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "lazy": ({}, {"ratio": 0.25, "sublayers": "both"}),
    "exact": ({"lazy": False, "screen": 1.0}, {"num_sublayers": 3, "sublayers": "both"}),
    "screened": ({"min_fresh": 1, "screen": 0.5, "objective": "absolute"}, {"num_sublayers": 3, "sublayers": "attention"}),
}


def _calib(n: int = 5) -> torch.Tensor:
    return torch.randint(3, 259, (n, 16), generator=torch.Generator().manual_seed(0))


def _prune(target: dict[str, Any], criterion: str = "sublayer_sleb") -> Any:
    return prune_config({"type": "prune", "units": "sublayers", "criterion": criterion, **target})


def _score(model: torch.nn.Module, pipeline: Any, case: str = "lazy") -> dict[str, Any]:
    settings, target = SETTINGS[case]
    out, _ = score_criteria("depth", NAMES, model, _calib(), settings={"sublayer_sleb": SublayerSLEBSettings(**settings)},
                            batch_size=2, num_remove=lambda: None, prune=_prune(target), progress=False,
                            pipeline=pipeline)
    return out


def _plans(model: torch.nn.Module, results: dict[str, Any], case: str) -> dict[str, Any]:
    return {name: SELECTIONS.impl("sublayers")(result, _prune(SETTINGS[case][1], name), model, None, results, None)[0]
            .to_json() for name, result in results.items()}


def _compare(full: dict[str, Any], seq: dict[str, Any], exact: dict[str, Any]) -> None:
    """Scores within the float floor (float64 ``full`` as the exact value), field by field."""
    for name in NAMES:
        floor = gaps(full[name], exact[name]) if _same_layout(full[name], exact[name]) else {}
        check(full[name], seq[name], floor, name)


class _Spy:
    """Counts what the walk's caches sent to disk, and the block-wise passes' tails taken or recomputed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offloaded, self.removals = 0, []
        spy = self

        class Cache(BoundaryCache):
            def put(self, batch: int, x: torch.Tensor) -> None:
                before = self.offloaded
                super().put(batch, x)
                spy.offloaded += self.offloaded - before

        remove = sublayer_blockwise.BlockwiseSublayerWalk.remove

        def removed(walk: Any, q: int, tails: Any = None) -> Any:
            spy.removals.append(tails is not None)
            return remove(walk, q, tails)

        monkeypatch.setattr(sublayer_blockwise, "BoundaryCache", Cache)
        monkeypatch.setattr(sublayer_blockwise.BlockwiseSublayerWalk, "remove", removed)


@pytest.mark.parametrize("case", list(SETTINGS))
def test_every_economy_of_the_greedy_takes_fulls_decisions(case: str, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """Tiny Llama (6 layers, tied head), every state offloaded (budget 0): scores within the floor, the same removal
    order, round by round values and plans; the offload folder is empty after."""
    model = tiny_llama(num_layers=6, tie=True, seed=3)
    full = _score(model, None, case)
    spy = _Spy(monkeypatch)
    seq = _score(model, SequentialPipeline(memory_budget_gb=0, offload_dir=str(tmp_path / "off")), case)
    monkeypatch.undo()
    exact = _score(copy.deepcopy(model).double(), None, case)
    _compare(full, seq, exact)
    assert seq["sublayer_sleb"]["sublayer_order"] == full["sublayer_sleb"]["sublayer_order"]
    assert _plans(model, seq, case) == _plans(model, full, case)
    assert spy.offloaded > 0 and list((tmp_path / "off").iterdir()) == []
    taken = {"lazy": True, "exact": False, "screened": True}[case]  # exact: 4+ candidates per pass, states recomputed
    assert spy.removals and all(t == taken for t in spy.removals)
    rounds = seq["sublayer_sleb"]["rounds"]
    assert (rounds[0]["screened"] > 0) == (case != "exact")


@pytest.mark.parametrize("family", ["qwen2", "olmo2", "granite"])
def test_other_sublayer_families_equal_full(family: str) -> None:
    """Biases (Qwen2), post-norms (OLMo 2), residual multipliers (Granite): the same layer ``forward`` in both walks."""
    model = tiny_family(family, num_layers=6)
    full = _score(model, None)
    seq = _score(model, SequentialPipeline(memory_budget_gb=0))
    _compare(full, seq, _score(copy.deepcopy(model).double(), None))
    assert _plans(model, seq, "lazy") == _plans(model, full, "lazy")


def test_parameter_counts_are_the_adapters() -> None:
    """The criteria count sublayer parameters by index (a streamed skeleton's layers stay on meta): the adapter's own
    count, which selection reads, on every sublayer family here (GLM-4: two norms per sublayer)."""
    from prunelab.stages.criteria.sublayer_nll import _params

    for model in (tiny_llama(num_layers=3), tiny_family("olmo2", num_layers=3), tiny_family("glm4", num_layers=3)):
        ad = adapter_for(model)
        assert _params(ad) == ad.sublayer_params()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (untied head) saved in several safetensors shards, with a tokenizer."""
    out = tmp_path_factory.mktemp("sublayers") / "model"
    tiny_llama(num_layers=6, tie=False, seed=5).save_pretrained(out, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(out)
    return out


def test_a_streamed_skeleton_scores_as_the_loaded_model(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """``load: streaming``: one layer resident during every forward, each read from the shards once per pass
    (sublayer_ppl: one pass, so L layer reads), states on disk, every layer back on meta after — and the scores and
    plans of ``full`` on the same weights loaded whole."""
    from transformers import AutoModelForCausalLM

    from prunelab.stages.calibration.sequential import SafetensorsWeights
    from prunelab.stages.calibration.streamed import load_streaming
    from prunelab.stages.io.config import ModelConfig

    model, _ = load_streaming(ModelConfig(source=str(folder), load="streaming"))
    layers = model.model.layers

    def resident() -> int:  # indexed: iterating inside the score stage would materialize each layer (layers_resident)
        return sum(any(p.device.type != "meta" for p in layers[i].parameters()) for i in range(len(layers)))

    seen: list[int] = []
    loads: list[int] = []
    run_block, block = ArchAdapter.run_block, SafetensorsWeights.block

    def block_spy(self: Any, index: int, hidden: Any, inputs: Any) -> Any:
        seen.append(resident())
        return run_block(self, index, hidden, inputs)

    def load_spy(self: Any, adapter: Any, index: int) -> Any:
        loads.append(index)
        return block(self, adapter, index)

    monkeypatch.setattr(ArchAdapter, "run_block", block_spy)
    monkeypatch.setattr(SafetensorsWeights, "block", load_spy)
    spy = _Spy(monkeypatch)
    pipeline = SequentialPipeline(memory_budget_gb=0, offload_dir=str(tmp_path / "off"))
    ppl, _ = score_criteria("depth", ["sublayer_ppl"], model, _calib(), batch_size=2, progress=False, pipeline=pipeline)
    assert loads == list(range(6)), loads  # one pass: the dense states and every candidate together
    seq = {**ppl, **_score(model, pipeline)}
    monkeypatch.undo()
    assert seen and set(seen) == {1}
    assert resident() == 0 and spy.offloaded > 0 and list((tmp_path / "off").iterdir()) == []
    whole = AutoModelForCausalLM.from_pretrained(folder).eval()
    full = _score(whole, None)
    _compare(full, seq, _score(copy.deepcopy(whole).double(), None))
    assert _plans(whole, seq, "lazy") == _plans(whole, full, "lazy")


def test_a_perturbed_walk_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: every sublayer output of the sequential walk moved by 1e-5 relative (far below what
    separates two sublayers' costs, far above the float floor) is reported beyond the floor."""
    model = tiny_llama(num_layers=6)
    full = _score(model, None)
    exact = _score(copy.deepcopy(model).double(), None)
    run = sublayer_blockwise.run_over_batches

    def nudged(adapter: Any, index: int, source: Any, target: Any, count: int, inputs: Any) -> None:
        class Scaled:
            def put(self, b: int, x: torch.Tensor) -> None:
                target.put(b, x * (1 + 1e-5))

        run(adapter, index, source, Scaled(), count, inputs)

    monkeypatch.setattr(sublayer_blockwise, "run_over_batches", nudged)
    seq = _score(model, SequentialPipeline(memory_budget_gb=0))
    with pytest.raises(AssertionError, match="beyond the float floor"):
        _compare(full, seq, exact)
