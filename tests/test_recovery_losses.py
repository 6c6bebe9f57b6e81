"""The recovery loss registry: names are unique, ``ce`` is the next-token loss the trainer always used, ``kd`` and
``ce+kd`` need the teacher (their maths: tests/test_distill.py)."""

from __future__ import annotations

import pytest
import torch


def test_a_loss_name_registers_once():
    from prunelab.stages.recovery.losses import LOSSES, get_loss, register_loss

    with pytest.raises(ValueError, match="recovery loss 'ce' is already registered"):
        register_loss("ce", lambda model, batch, teacher: torch.zeros(()))
    assert get_loss("ce").fn.__name__ == "next_token_ce" and not get_loss("ce").needs_teacher
    with pytest.raises(KeyError, match=r"unknown recovery loss 'kl'; choose one of"):
        get_loss("kl")
    assert sorted(LOSSES.names()) == ["ce", "ce+kd", "kd"]
    assert get_loss("kd").needs_teacher and get_loss("ce+kd").needs_teacher


def test_recipes_name_exactly_the_registered_losses():
    from pydantic import ValidationError

    from prunelab.stages.core.registry import variant_names
    from prunelab.stages.recovery.config import RecoverySettings
    from prunelab.stages.recovery.losses import LOSSES

    assert variant_names(RecoverySettings.model_fields["loss"]) == LOSSES.names()
    data = {"source": {"path": "tests/data/tiny_corpus.txt"}}
    for name in LOSSES.names():
        assert RecoverySettings.model_validate({"loss": name, "data": data}).loss.type == name
    with pytest.raises(ValidationError, match=r"recovery loss 'kl': choose ce \| kd \| ce\+kd"):
        RecoverySettings.model_validate({"loss": "kl", "data": data})


def test_ce_is_transformers_shifted_cross_entropy(tiny_model):
    from prunelab.stages.recovery.data import IGNORE, collate
    from prunelab.stages.recovery.losses import get_loss

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = IGNORE
    batch = collate(0)([{"idx": i, "input_ids": ids[i], "labels": labels[i]} for i in range(2)])
    batch.pop("idx")
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE)
    torch.testing.assert_close(get_loss("ce").fn(tiny_model, batch, None), expected)
