"""Issue 27 item 3 for the calibration room: a new statistic is one observer, a new calibration source one
registration — both added here, from a test module, without touching library code."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from prunelab.stages.calibration.needs import NEEDS, NeedSpec, refusals, resolve
from prunelab.stages.calibration.observers import Observer
from prunelab.stages.calibration.pipelines import SequentialPipeline, collect
from prunelab.stages.calibration.sources import SOURCES, SourceSpec, calibration_windows, source_kind
from prunelab.stages.core.config import StrictModel
from prunelab.stages.io.tiny import tiny_llama


class TokenNorms(Observer):
    """Σ ‖x_out‖ per block: a statistic no library criterion needs."""

    STATES = True

    def __init__(self, stats: Any, adapter: Any, needs: frozenset[str]) -> None:
        super().__init__(stats, adapter, needs)
        stats.token_norms = torch.zeros(stats.num_blocks, dtype=torch.float64)

    def after_block(self, index: int, x_in: torch.Tensor, x_out: torch.Tensor, batch: int) -> None:
        self.stats.token_norms[index] += x_out.double().norm(dim=-1).sum()


def test_a_new_statistic_is_one_observer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(NEEDS._entries, "token_norms", NeedSpec("token_norms", TokenNorms))
    model = tiny_llama(num_layers=3)
    calib = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    full = collect(model, calib, {"token_norms"}, batch_size=2, progress=False)
    seq = collect(model, calib, {"token_norms"}, batch_size=2, progress=False, pipeline=SequentialPipeline())
    assert bool((full.token_norms > 0).all())
    torch.testing.assert_close(seq.token_norms, full.token_norms, rtol=1e-9, atol=0)


def test_needs_resolve_requirements_first_and_name_unknown_ones() -> None:
    assert [s.name for s in resolve({"hessian"})] == ["activations", "hessian"]
    assert [s.name for s in resolve({"fisher"})] == ["grad", "fisher"]
    with pytest.raises(ValueError, match="unknown calibration statistic 'gradz'; known: .*grad"):
        resolve({"gradz"})
    assert refusals("sequential", {"calibration", "boundary"}) == {}  # the sublayer removals run block-wise too
    assert refusals("sequential", {"fisher", "boundary"}) == {}  # the block-wise backward serves gradients
    assert refusals("full", {"fisher", "boundary", "calibration"}) == {}


class RepeatSource(StrictModel):
    repeat: int

    def describe(self) -> str:
        return f"token {self.repeat} repeated"


def _repeat_windows(source: RepeatSource, model: Any, tokenizer: Any, n: int, seq_len: int, seed: int, *_: Any) -> Any:
    return torch.full((n, seq_len), source.repeat, dtype=torch.long)


def test_a_new_calibration_source_is_one_registration(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from prunelab.stages.calibrate import CalibrateConfig

    monkeypatch.setitem(SOURCES._entries, "repeat", SourceSpec("repeat", RepeatSource, "repeat", _repeat_windows))
    cfg = CalibrateConfig.model_validate({"type": "calibrate", "source": {"repeat": 7}, "num_samples": 3, "seq_len": 5})
    assert source_kind(cfg.source) == "repeat" and cfg.source.describe() == "token 7 repeated"
    assert torch.equal(calibration_windows(cfg.source, None, None, 3, 5, 0, tmp_path), torch.full((3, 5), 7))
    mixed = CalibrateConfig.model_validate({"type": "calibrate", "source": {"mix": [
        {"source": {"repeat": 1}, "weight": 1}, {"source": {"repeat": 2}, "weight": 1}]}, "num_samples": 4, "seq_len": 3})
    assert calibration_windows(mixed.source, None, None, 4, 3, 0, tmp_path)[:, 0].tolist() == [1, 1, 2, 2]
    with pytest.raises(ValidationError, match="source.repeat"):  # its own fields, named
        CalibrateConfig.model_validate({"type": "calibrate", "source": {"repeat": "x"}})


def test_a_mix_inside_a_mix_is_refused() -> None:
    from prunelab.stages.calibrate import CalibrateConfig

    inner = {"mix": [{"source": {"path": "tests/data/tiny_corpus.txt"}, "weight": 1}] * 2}
    with pytest.raises(ValidationError, match="cannot be part of a mix"):
        CalibrateConfig.model_validate({"type": "calibrate", "source": {"mix": [
            {"source": inner, "weight": 1}, {"source": {"path": "tests/data/tiny_corpus.txt"}, "weight": 1}]}})
