"""A family added from one module (issue 27 item 1): this test module is that module. It registers a transformers
model type of its own (a Llama-layout ``prunelab_toy``), its ``FamilyFacts`` and its adapter — no library file lists
it — and the family then works end to end: every torch-free table has it, ``--dry-run`` accepts its model_type, its
tiny model builds, removing each unit kind equals masking it (vanilla reload included), and a debug recipe runs."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from exactness import assert_masked_and_reload_equal
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prunelab.stages.arch import ARCHS, register_family
from prunelab.stages.arch.base import ArchAdapter
from prunelab.stages.arch.facts import FamilyFacts

TOY = "prunelab_toy"


class ToyConfig(LlamaConfig):
    model_type = TOY


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig


class ToyAdapter(ArchAdapter):
    """The Llama layout under a model_type of its own: ArchAdapter's defaults are the whole adapter."""

    family = "Toy"


FACTS = FamilyFacts(model_types=(TOY,), adapter=f"{__name__}:ToyAdapter", sublayers=True,
                    engines={"llama.cpp": "llama"}, tiny={"head_dim": 16}, tiny_layers=3)


def _dry_run(source: str, tmp_path: Path, recipe: str = "recipes/debug-llama.yaml", dry: bool = True) -> tuple[int, str]:
    from prunelab.run import main

    out = io.StringIO()
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        rc = main([recipe, "--output-dir", str(tmp_path / "run"), "--no-progress", *(["--dry-run"] if dry else []),
                   f"model.source={source}"])
    return rc, out.getvalue()


def _toy_folder(tmp_path: Path) -> Path:
    """A saved ``prunelab_toy`` checkpoint (config.json and weights)."""
    folder = tmp_path / "toy"
    cfg = ToyConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    ToyForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[FamilyFacts]:
    """The family registered for one test, and gone after it (the registry is restored)."""
    AutoConfig.register(TOY, ToyConfig, exist_ok=True)
    AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)
    monkeypatch.setattr(ARCHS, "_entries", dict(ARCHS._entries))
    assert TOY not in ARCHS
    yield register_family(FACTS)


def test_every_table_reads_the_registered_facts(toy: FamilyFacts) -> None:
    from prunelab.stages.arch import (FAMILY_MODULES, MOE_FAMILIES, NO_OUTPUT_BIAS, SUBLAYER_FAMILIES, adapter_class,
                                      compensation_refusal, supported_model_types)
    from prunelab.stages.io.sources import TINY_ALIASES, TINY_FAMILY, TINY_SHAPES, classify
    from prunelab.stages.io.tiny import tiny_alias
    from prunelab.stages.selection.engines import per_layer_families

    assert TOY in supported_model_types() and FAMILY_MODULES[TOY] == __name__
    assert TOY in SUBLAYER_FAMILIES and TOY not in MOE_FAMILIES and TOY not in NO_OUTPUT_BIAS
    assert compensation_refusal(TOY) is None and TOY not in per_layer_families("llama.cpp")
    cls = adapter_class(TOY)
    assert cls is ToyAdapter and cls.model_types == (TOY,) and cls.SUBLAYER_REMOVAL and cls.FACTS == toy
    alias = f"tiny-random-{TOY}"
    assert TINY_ALIASES[alias] == 3 and TINY_FAMILY[alias] == TOY and classify(alias, None).kind == "tiny"
    model = tiny_alias(alias)
    assert model.config.model_type == TOY and model.config.num_hidden_layers == 3
    assert TINY_SHAPES[alias].param_counts()[0] == sum(p.numel() for p in model.parameters())


def test_dry_run_refuses_the_model_type_until_it_is_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    AutoConfig.register(TOY, ToyConfig, exist_ok=True)
    folder = _toy_folder(tmp_path)
    rc, out = _dry_run(str(folder), tmp_path)
    assert rc != 0 and f"{TOY!r} has no architecture adapter" in out, out
    monkeypatch.setattr(ARCHS, "_entries", dict(ARCHS._entries))
    register_family(FACTS)
    for source in (str(folder), f"tiny-random-{TOY}"):
        rc, out = _dry_run(source, tmp_path)
        assert rc == 0, out


@pytest.mark.parametrize("kind", ["block", "kv_group", "q_head", "mlp_channel", "hidden_channel"])
def test_removing_each_unit_kind_equals_masking_it(toy: FamilyFacts, kind: str, calib: torch.Tensor,
                                                    tmp_path: Path) -> None:
    from prunelab.stages.arch import adapter_for
    from prunelab.stages.io.tiny import tiny_family
    from tests.test_arch import _prune

    model = tiny_family(TOY, num_layers=3)
    assert type(adapter_for(model)) is ToyAdapter
    masked = copy.deepcopy(model)
    _prune(model, kind, masked)
    assert_masked_and_reload_equal(model, masked, calib, tmp_path)


def test_a_debug_recipe_runs_on_the_family(toy: FamilyFacts, tmp_path: Path) -> None:
    """recipes/debug-llama.yaml (Wanda-sp width pruning, LoRA, export) on ``tiny-random-prunelab_toy``."""
    rc, out = _dry_run(f"tiny-random-{TOY}", tmp_path, dry=False)
    assert rc == 0, out[-3000:]
    exported = json.loads(next((tmp_path / "run").rglob("config.json")).read_text())
    assert exported["model_type"] == TOY
