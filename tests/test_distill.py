"""Distillation from the dense teacher (``loss: kd | ce+kd``) and full fine-tuning (``method: full``): the maths of
the KD loss against a direct formula, the teacher frozen, the settings validated, and tiny runs that train.
Tiny random models on the CPU; seconds each. (Two processes: tests/test_recover.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from prunelab.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/debug-distill.yaml"
DATA = {"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 32, "max_samples": 16}


def _logits(seed: int, shape=(2, 7, 11)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


# ----------------------------------------------------------------------------- the KD loss
def test_kd_is_forward_kl_with_temperature_squared():
    """KL(softmax(t/T) ‖ softmax(s/T))·T², mean over positions whose NEXT token has a label."""
    from prunelab.stages.recovery.losses import kd_divergence

    s, t = _logits(0), _logits(1)
    labels = torch.ones(2, 7, dtype=torch.long)
    labels[0, :3] = -100  # prompt tokens: positions 0 and 1 of row 0 predict unlabelled tokens 1 and 2
    T = 2.0
    got = kd_divergence(s, t, labels, temperature=T)
    mask = labels[:, 1:] != -100
    ps, pt = F.log_softmax(s[:, :-1][mask] / T, -1), F.log_softmax(t[:, :-1][mask] / T, -1)
    expected = F.kl_div(ps, pt, log_target=True, reduction="batchmean") * T * T
    torch.testing.assert_close(got, expected)
    assert mask.sum() == 10
    assert kd_divergence(t, t, labels, temperature=T).abs() < 1e-6  # the student equal to the teacher: zero
    assert kd_divergence(s, t, torch.full_like(labels, -100)) == 0  # nothing labelled: zero, not NaN


def test_top_k_renormalises_both_distributions_over_the_teachers_k_largest():
    from prunelab.stages.recovery.losses import kd_divergence

    s, t = _logits(2, (1, 4, 9)), _logits(3, (1, 4, 9))
    labels = torch.ones(1, 4, dtype=torch.long)
    got = kd_divergence(s, t, labels, temperature=1.5, top_k=3)
    total = 0.0
    for i in range(3):
        idx = t[0, i].topk(3).indices
        pt = F.softmax(t[0, i, idx] / 1.5, -1)
        ps = F.softmax(s[0, i, idx] / 1.5, -1)
        total += (pt * (pt.log() - ps.log())).sum()
    torch.testing.assert_close(got, total / 3 * 1.5**2)
    # k as large as the vocabulary is the full KL
    torch.testing.assert_close(kd_divergence(s, t, labels, top_k=9), kd_divergence(s, t, labels))


def test_ce_plus_kd_mixes_with_kd_ratio(tiny_model):
    from prunelab.stages.io.tiny import tiny_llama
    from prunelab.stages.recovery.config import LossSettings
    from prunelab.stages.recovery.losses import Teacher, get_loss

    teacher = Teacher(tiny_llama(num_layers=6, seed=1))
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    ce = get_loss("ce").fn(tiny_model, batch, None, None)
    kd = get_loss("kd").fn(tiny_model, batch, teacher, LossSettings(type="kd", temperature=2.0))
    mixed = get_loss("ce+kd").fn(tiny_model, batch, teacher, LossSettings(type="ce+kd", temperature=2.0, kd_ratio=0.25))
    torch.testing.assert_close(mixed, 0.75 * ce + 0.25 * kd)
    assert teacher.seconds > 0 and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())


# ----------------------------------------------------------------------------- the intermediate (block-output) loss
def test_block_pairs_follow_the_plan():
    from prunelab.stages.recovery.losses import block_pairs

    depth = SimpleNamespace(kind="depth", removed_blocks=[3, 4])
    # hidden_states index i + 1 = output of block i; student block j ↔ teacher block kept[j] = [0, 1, 2, 5][j]
    assert block_pairs(depth, 6, 4) == [(1, 1), (2, 2), (3, 3), (4, 6)]
    # the last teacher block removed: the student's last state is after the final norm, the teacher's kept[-1] not
    assert block_pairs(SimpleNamespace(kind="depth", removed_blocks=[5]), 6, 5) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert block_pairs(SimpleNamespace(kind="width"), 3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert block_pairs(None, 2, 2) == [(1, 1), (2, 2)]  # the dense control
    with pytest.raises(ValueError, match="hidden-channel plan changes the width"):
        block_pairs(SimpleNamespace(kind="hidden"), 3, 3)
    with pytest.raises(ValueError, match="keeps 4 of the teacher's 6 blocks but the student has 5"):
        block_pairs(depth, 6, 5)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_intermediate_loss_compares_the_paired_block_outputs(kind):
    from prunelab.stages.io.tiny import tiny_llama
    from prunelab.stages.recovery.config import LossSettings
    from prunelab.stages.recovery.losses import Teacher, block_pairs, get_loss, kd_divergence

    teacher_model = tiny_llama(num_layers=6, seed=0)
    student = tiny_llama(num_layers=4, seed=5)
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    pairs = block_pairs(SimpleNamespace(kind="depth", removed_blocks=[1, 4]), 6, 4)
    teacher = Teacher(teacher_model, pairs)
    settings = LossSettings(type="kd", intermediate={"weight": 0.3, "kind": kind})
    got = get_loss("kd").fn(student, batch, teacher, settings)
    s = student(input_ids=ids, output_hidden_states=True)
    t = teacher_model(input_ids=ids, output_hidden_states=True)
    mask = labels[:, 1:] != -100
    dist = []
    for si, ti in pairs:
        a, b = s.hidden_states[si][:, :-1][mask], t.hidden_states[ti][:, :-1][mask]
        dist.append((1 - F.cosine_similarity(a, b, dim=-1)).mean() if kind == "cosine" else ((a - b) ** 2).mean())
    expected = kd_divergence(s.logits, t.logits, labels) + 0.3 * sum(dist) / len(dist)
    torch.testing.assert_close(got, expected)
    # the student equal to the teacher, paired block for block: nothing to learn
    same = Teacher(tiny_llama(num_layers=4, seed=5), block_pairs(None, 4, 4))
    assert get_loss("kd").fn(student, batch, same, settings).abs() < 1e-5


# ----------------------------------------------------------------------------- settings
def test_loss_settings_shorthand_groups_and_errors():
    cfg = load_recipe(RECIPE).stages["recover"]
    assert (cfg.loss.type, cfg.loss.temperature, cfg.loss.top_k, cfg.loss.needs_teacher) == ("kd", 1.0, 0, True)
    short = load_recipe(RECIPE, ["stages.recover.loss=ce+kd"]).stages["recover"]
    assert (short.loss.type, short.loss.kd_ratio) == ("ce+kd", 0.5)
    for override, needle in [
        ("stages.recover.loss.temperature=0", "stages.recover.loss.temperature"),
        ("stages.recover.loss.kd_ratio=1.5", "stages.recover.loss.kd_ratio"),
        ("stages.recover.loss.kd_ratio=0.3", "kd_ratio mixes ce and kd: it applies to type ce+kd only"),
        ("stages.recover.loss.top_k=-1", "stages.recover.loss.top_k"),
        ("stages.recover.loop.temperature=2", "loop.temperature: `temperature` does not belong in `loop`; write loss.temperature"),
        ("stages.recover.temperature=2", "`temperature` is a loss setting; write loss.temperature"),
        ("stages.recover.loss.tmp=2", "stages.recover.loss.tmp: unknown key"),
        ("stages.recover.method=half", "stages.recover.method"),
    ]:
        with pytest.raises(RecipeError) as err:
            load_recipe(RECIPE, [override])
        assert needle in str(err.value), (override, str(err.value))
    with pytest.raises(RecipeError, match="apply to type kd or ce.kd, not ce"):
        load_recipe(RECIPE, ["stages.recover.loss={type: ce, temperature: 2}"])


def test_new_settings_never_share_a_version_1_hash():
    """``ce`` dumps as the string it always was (hashes unchanged); kd and full cannot look like a version-1 run."""
    ce = load_recipe("recipes/debug-recover.yaml").stages["recover"]
    assert ce.model_dump(mode="json")["loss"] == "ce" and "loss" not in ce.v1_settings()
    kd = load_recipe("recipes/debug-recover.yaml", ["stages.recover.loss=kd"]).stages["recover"]
    assert kd.v1_settings()["loss"]["type"] == "kd"
    full = load_recipe("recipes/debug-recover.yaml", ["stages.recover.method=full"]).stages["recover"]
    assert full.v1_settings()["method"] == "full"
    assert type(kd).model_validate(kd.model_dump(mode="json")) == kd
    mix = load_recipe("recipes/debug-recover.yaml", ["stages.recover.loss=ce+kd"]).stages["recover"]
    assert type(mix).model_validate(mix.model_dump(mode="json")) == mix and mix.model_dump()["loss"]["kd_ratio"] == 0.5


# ----------------------------------------------------------------------------- training
def _env():
    from accelerate import Accelerator

    from prunelab.stages.io.tiny import byte_tokenizer
    from prunelab.stages.recovery.trainer import TrainerEnv

    return TrainerEnv(accelerator=Accelerator(cpu=True), tokenizer=byte_tokenizer(), seed=0, progress=False)


def _settings(**kw):
    from prunelab.stages.recovery.config import RecoverySettings

    base = {"data": DATA, "lora": {"dropout": 0.0}, "optimizer": {"lr": 3e-3},
            "loop": {"batch_size": 4, "micro_batch_size": 2, "max_steps": 8}}
    return RecoverySettings(**{**base, **kw})


def test_kd_trains_toward_the_teacher_and_leaves_it_untouched(tmp_path, tiny_model):
    from prunelab.stages.io.tiny import tiny_llama
    from prunelab.stages.recovery.trainer import recover_model

    teacher = tiny_llama(num_layers=6, seed=0)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    student = tiny_llama(num_layers=4, seed=3)
    info = recover_model(_env(), _settings(loss={"type": "kd", "temperature": 2.0, "top_k": 16},
                                           loop={"batch_size": 4, "micro_batch_size": 2, "max_steps": 12}),
                         student, tmp_path, "pruned", teacher=teacher)
    assert info["loss"] == "kd" and info["final_loss"] < info["first_loss"]
    assert info["teacher"]["s_per_step"] > 0 and info["teacher"]["tokens_per_s_without_teacher"] > info["tokens_per_s"]
    for n, p in teacher.named_parameters():
        assert torch.equal(p, before[n]) and not p.requires_grad
    with pytest.raises(ValueError, match="needs the dense teacher"):
        recover_model(_env(), _settings(loss="kd"), student, tmp_path / "none", "pruned")


def test_teacher_cache_trains_like_the_live_teacher(tmp_path):
    """top-k logits written once and read back: the same losses and adapter as the live teacher with that top_k."""
    from safetensors.torch import load_file

    from prunelab.stages.io.tiny import tiny_llama
    from prunelab.stages.recovery.trainer import recover_model

    runs = {}
    for cache in (False, True):
        cfg = _settings(loss={"type": "ce+kd", "temperature": 2.0, "top_k": 8, "teacher_cache": cache})
        teacher = tiny_llama(num_layers=6, seed=0)
        runs[cache] = recover_model(_env(), cfg, tiny_llama(num_layers=4, seed=3), tmp_path / str(cache), "pruned",
                                    teacher=teacher)
        if cache:
            assert teacher.model.embed_tokens.weight.is_meta  # released after the pass
    assert runs[True]["teacher"]["cached"] and runs[True]["teacher"]["cache_pass_s"] > 0
    assert (tmp_path / "True" / "teacher-cache" / "values.npy").is_file()
    live = json.loads((tmp_path / "False" / "loss.json").read_text())["loss"]
    cached = json.loads((tmp_path / "True" / "loss.json").read_text())["loss"]
    assert cached == pytest.approx(live, rel=1e-4)
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("False", "True"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="teacher_cache stores the teacher's top-k logits only"):
        _settings(loss={"type": "kd", "teacher_cache": True})


def test_full_fine_tuning_changes_every_weight_and_overfits(tmp_path, tiny_model):
    from prunelab.stages.recovery.trainer import recover_model

    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    info = recover_model(_env(), _settings(method="full", data={**DATA, "max_samples": 4}, optimizer={"lr": 1e-3},
                                           loop={"batch_size": 4, "micro_batch_size": 2, "max_steps": 10}),
                         tiny_model, tmp_path, "pruned")
    merged = info.pop("model")
    assert merged is tiny_model  # the trained weights copied into the caller's model: nothing to merge
    assert info["final_loss"] < 0.8 * info["first_loss"]  # one batch of 4 samples, 10 steps: it overfits
    unchanged = [n for n, p in merged.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"weights that did not train: {unchanged}"
    assert not (tmp_path / "adapter").exists() and (tmp_path / "weights").is_dir()
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_full_fine_tuning_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from prunelab.stages.io.tiny import tiny_llama
    from prunelab.stages.recovery import trainer

    cfg = _settings(method="full", checkpoint={"save_every": 2}, loop={"batch_size": 4, "micro_batch_size": 2, "max_steps": 4})
    ref = trainer.recover_model(_env(), cfg, tiny_llama(num_layers=4), tmp_path / "ref", "pruned")
    finish = trainer.finish_step

    def crash(env, run, *args, **kwargs):
        finish(env, run, *args, **kwargs)
        if run.step == 3:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(trainer, "finish_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.recover_model(_env(), cfg, tiny_llama(num_layers=4), tmp_path / "cut", "pruned")
    monkeypatch.setattr(trainer, "finish_step", finish)
    env = _env()
    env.resume = True
    resumed = trainer.recover_model(env, cfg, tiny_llama(num_layers=4), tmp_path / "cut", "pruned")
    assert resumed["resumed_from"] == "step-2"
    assert json.loads((tmp_path / "cut" / "loss.json").read_text())["loss"] == pytest.approx(
        json.loads((tmp_path / "ref" / "loss.json").read_text())["loss"], rel=1e-6)
    theirs = dict(ref["model"].named_parameters())
    for n, p in resumed["model"].named_parameters():
        torch.testing.assert_close(p, theirs[n], rtol=1e-5, atol=1e-6)


def test_debug_distill_recipe_runs_through_the_cli(tmp_path):
    from prunelab.run import main

    assert main([RECIPE, "--output-dir", str(tmp_path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "debug-distill" / "metrics.json").read_text())
    rec = metrics["recover"]["pruned"]
    assert rec["loss"] == "kd" and rec["teacher"]["tokens_per_s_without_teacher"] > 0
    assert metrics["eval"]["recovered"]["tiny"]["ppl"] < metrics["eval"]["pruned"]["tiny"]["ppl"]
    assert (tmp_path / "debug-distill" / "model" / "config.json").is_file()
    # --resume restores the finished recovery instead of training again
    assert main([RECIPE, "--output-dir", str(tmp_path), "--no-progress", "--resume"]) == 0
    again = json.loads((tmp_path / "debug-distill" / "metrics.json").read_text())
    assert again["eval"]["recovered"] == metrics["eval"]["recovered"]


def test_intermediate_loss_through_the_cli(tmp_path):
    from prunelab.run import main

    args = [RECIPE, "--output-dir", str(tmp_path), "--no-progress",
            "stages.recover.loss.intermediate={weight: 0.5, kind: cosine}"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "debug-distill" / "metrics.json").read_text())
    rec = metrics["recover"]["pruned"]
    assert rec["final_loss"] < rec["first_loss"]


def test_full_method_through_the_cli_restores_on_resume(tmp_path):
    from prunelab.run import main

    args = [RECIPE, "--output-dir", str(tmp_path), "--no-progress", "stages.recover.method=full",
            "stages.recover.loss=ce+kd", "stages.recover.optimizer.lr=1e-4"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "debug-distill" / "metrics.json").read_text())
    assert (tmp_path / "debug-distill" / "06-recover" / "weights").is_dir()
    assert main([*args, "--resume"]) == 0
    again = json.loads((tmp_path / "debug-distill" / "metrics.json").read_text())
    assert again["eval"]["recovered"] == metrics["eval"]["recovered"]
