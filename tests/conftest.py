"""Shared fixtures: tiny random Llama models (GQA, tied or untied embeddings) and token batches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_model():
    from prunelab.stages.io.tiny import tiny_llama

    return tiny_llama(num_layers=6, heads=4, kv_heads=2, tie=True)


@pytest.fixture
def tiny_untied():
    from prunelab.stages.io.tiny import tiny_llama

    return tiny_llama(num_layers=5, hidden=96, heads=6, kv_heads=3, tie=False, seed=1)


@pytest.fixture
def calib() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, 259, (3, 24), generator=gen)


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    """Recipes use paths relative to the project root, as the CLI does."""
    monkeypatch.chdir(ROOT)
