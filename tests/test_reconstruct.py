"""Block-local reconstruction (``stages/reconstruct.py``, ``prunelab.stages.recovery.reconstruct``) on tiny random
Llamas pruned by FLAP + optimal compensation: each block's MSE to the dense block falls; an unpruned block is left
bit for bit; a run killed after a block resumes to the same weights; the widths stay, and the result reloads in
vanilla transformers; bad settings fail at validation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from prunelab.stages.io.tiny import tiny_llama
from prunelab.stages.recovery import reconstruct as rec
from prunelab.stages.reconstruct import ReconstructConfig


def _windows(n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(seed))


_PAIRS: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}


def _pair(allocation: str = "global") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense, pruned copy): FLAP + optimal compensation at 25% of the parameters (``uniform``: the same widths in
    every layer, a vanilla checkpoint); pruned once per session, every test gets its own copies."""
    if allocation not in _PAIRS:
        import prunelab

        dense = tiny_llama(num_layers=4, heads=4, kv_heads=2, tie=True).eval()
        pruned = copy.deepcopy(dense)
        prunelab.prune(pruned, calibration=_windows(8, 32, seed=1), criterion="flap", units="width", ratio=0.25,
                       allocation=allocation, compensation="optimal")
        _PAIRS[allocation] = (dense, pruned)
    return copy.deepcopy(_PAIRS[allocation][0]), copy.deepcopy(_PAIRS[allocation][1])


def _same(a: torch.nn.Module, b: torch.nn.Module, tol: float = 0.0) -> bool:
    """Equal state dicts, compared by name (a merged LoRA re-registers ``weight`` after ``bias``)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all((sa[k] - sb[k]).abs().max().item() <= tol for k in sa)


def _cfg(**kw) -> ReconstructConfig:
    return ReconstructConfig(**{"type": "reconstruct", "steps": 8, "batch_size": 4, "lr": 1e-3, **kw})


@torch.no_grad()
def _block_mse(student: torch.nn.Module, dense: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    """Each block's MSE to the dense block, both on the DENSE block inputs (computed independently of the engine)."""
    from prunelab.stages.arch import adapter_for

    sa, ta = adapter_for(student), adapter_for(dense)
    x = ta.embed(ids)
    prepared = ta.prepare(x)
    out = []
    for i in range(ta.num_blocks):
        y = ta.run_block(i, x, prepared)
        out.append(torch.nn.functional.mse_loss(sa.run_block(i, x, sa.prepare(x)), y).item())
        x = y
    return out


@pytest.mark.parametrize("settings", [
    {"inputs": "dense"},
    {"inputs": "pruned", "sublayers": "separate"},
    {"inputs": "dense", "train": "lora", "lr": 1e-2},
])
def test_reconstruction_lowers_every_block_mse(settings: dict, tmp_path: Path) -> None:
    dense, pruned = _pair()
    ids = _windows()
    before = _block_mse(pruned, dense, ids)
    info = rec.reconstruct(pruned, dense, ids, _cfg(**settings), tmp_path, progress=False)
    after = _block_mse(pruned, dense, ids)
    assert all(b["loss_after"] < b["loss_before"] for b in info["blocks"]), info["blocks"]
    if settings["inputs"] == "dense":  # the engine's numbers are the independent ones, and both fell
        assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
        assert [b["loss_before"] for b in info["blocks"]] == pytest.approx(before, rel=1e-4)
    assert info["final_loss"] < info["first_loss"]
    assert info["steps"] == 4 * 8 * (2 if settings.get("sublayers") == "separate" else 1)


def test_a_block_made_worse_is_kept_as_it_was(tmp_path: Path) -> None:
    """A learning rate far too high raises the MSE: those blocks go back to their pruned weights, so no block ends
    worse than it started (on the windows it was trained on)."""
    dense, pruned = _pair()
    info = rec.reconstruct(pruned, dense, _windows(), _cfg(inputs="dense", lr=1.0), tmp_path, progress=False)
    assert any(b.get("reverted") for b in info["blocks"])
    assert all(b["loss_after"] <= b["loss_before"] for b in info["blocks"])
    _, untouched = _pair()
    from prunelab.stages.arch import adapter_for

    for i, b in enumerate(info["blocks"]):
        if b.get("reverted"):
            assert _same(adapter_for(pruned).layers[i], adapter_for(untouched).layers[i])


@pytest.mark.parametrize("inputs", ["dense", "pruned"])
def test_unpruned_blocks_stay_bit_for_bit(inputs: str, tmp_path: Path) -> None:
    """Nothing removed: every block's loss is exactly 0, and no weight moves."""
    dense = tiny_llama(num_layers=3, heads=4, kv_heads=2, tie=True).eval()
    student = copy.deepcopy(dense)
    info = rec.reconstruct(student, dense, _windows(), _cfg(inputs=inputs), tmp_path, progress=False)
    assert [b["loss_before"] for b in info["blocks"]] == [0.0] * 3
    assert [b["loss_after"] for b in info["blocks"]] == [0.0] * 3
    assert _same(student, dense)


def test_partly_unpruned_block_left_alone(tmp_path: Path) -> None:
    """Block 0 restored to its dense weights after a prune (same shape): on the dense inputs it stays exactly
    as it is while the pruned blocks train."""
    dense, pruned = _pair()
    from prunelab.stages.arch import adapter_for

    sa, ta = adapter_for(pruned), adapter_for(dense)
    sa.layers[0] = copy.deepcopy(ta.layers[0])
    kept = {k: v.clone() for k, v in sa.layers[0].state_dict().items()}
    moved = {k: v.clone() for k, v in sa.layers[1].state_dict().items()}
    info = rec.reconstruct(pruned, dense, _windows(), _cfg(inputs="dense"), tmp_path, progress=False)
    assert info["blocks"][0]["loss_before"] == 0.0 and info["blocks"][0]["steps"] == {}
    assert all(torch.equal(v, kept[k]) for k, v in sa.layers[0].state_dict().items())
    assert any(not torch.equal(v, moved[k]) for k, v in sa.layers[1].state_dict().items())


class _Killed(Exception):
    pass


@pytest.mark.parametrize("train", ["weights", "lora"])
def test_resume_after_kill_gives_the_same_weights(train: str, tmp_path: Path, monkeypatch) -> None:
    dense, pruned = _pair()
    ids = _windows()
    kw = {"train": train, "lr": 1e-2 if train == "lora" else 1e-3}
    whole = copy.deepcopy(pruned)
    rec.reconstruct(whole, dense, ids, _cfg(**kw), tmp_path / "whole", progress=False)

    real_save = rec.save_block

    def save_then_die(folder: Path, index: int, layer: torch.nn.Module, info: dict) -> None:
        real_save(folder, index, layer, info)
        if index == 1:
            raise _Killed

    killed = copy.deepcopy(pruned)
    monkeypatch.setattr(rec, "save_block", save_then_die)
    with pytest.raises(_Killed):
        rec.reconstruct(killed, dense, ids, _cfg(**kw), tmp_path / "run", progress=False)
    monkeypatch.setattr(rec, "save_block", real_save)
    resumed = copy.deepcopy(pruned)  # a new process: the pruned model again, the blocks read from the stage folder
    info = rec.reconstruct(resumed, dense, ids, _cfg(**kw), tmp_path / "run", resume=True, progress=False)
    assert [b.get("resumed", False) for b in info["blocks"]] == [True, True, False, False]
    # measured on this CPU: max |Δ| = 0 (same ops, same order, same seeded batches); 1e-6 leaves room for other BLAS
    assert _same(resumed, whole, 1e-6)
    # other settings: the saved blocks are not theirs and are not reused
    other = copy.deepcopy(pruned)
    info = rec.reconstruct(other, dense, ids, _cfg(**{**kw, "steps": 3}), tmp_path / "run", resume=True,
                           progress=False)
    assert not any(b.get("resumed", False) for b in info["blocks"])


def test_widths_kept_and_vanilla_reload(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from prunelab.stages.arch import adapter_for

    dense, pruned = _pair("uniform")  # uniform widths: a vanilla checkpoint (per-layer widths load through prunelab.load)
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert shapes != {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    rec.reconstruct(pruned, dense, _windows(), _cfg(train="lora", lr=1e-2, sublayers="separate"), tmp_path / "r",
                    progress=False)
    assert {k: tuple(v.shape) for k, v in pruned.state_dict().items()} == shapes
    assert not any(p.requires_grad for p in pruned.parameters())
    assert all(type(m) is torch.nn.Linear for _, m in adapter_for(pruned).linears(adapter_for(pruned).layers[0]))
    pruned.save_pretrained(tmp_path / "saved")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = _windows(2, 24, seed=5)
    with torch.no_grad():
        assert (fresh(ids).logits - pruned(ids).logits).abs().max().item() <= 1e-5
    # the stage's restore puts the same weights into a freshly pruned model
    _, again = _pair("uniform")
    rec.restore_blocks(again, tmp_path / "r")
    assert _same(again, pruned)


def test_offloaded_boundaries_and_streamed_teacher_match_resident(tmp_path: Path) -> None:
    """memory_budget_gb: 0 (every boundary state memory-mapped) and a dense teacher read block by block from
    safetensors into a meta skeleton give the same weights as everything resident."""
    from prunelab.stages.calibration.sequential import SafetensorsWeights, skeleton

    dense, pruned = _pair()
    ids = _windows()
    resident = copy.deepcopy(pruned)
    rec.reconstruct(resident, dense, ids, _cfg(), tmp_path / "a", progress=False)
    dense.save_pretrained(tmp_path / "dense")
    streamed = copy.deepcopy(pruned)
    rec.reconstruct(streamed, skeleton(tmp_path / "dense"), ids, _cfg(memory_budget_gb=0), tmp_path / "b",
                    progress=False, teacher_weights=SafetensorsWeights(tmp_path / "dense"))
    assert _same(streamed, resident, 1e-6)
    assert not list((tmp_path / "b" / "boundaries").glob("*.bin"))  # offloaded states removed after


def test_bad_settings_fail_at_validation() -> None:
    from prunelab.recipe import RecipeError, validate

    with pytest.raises(ValueError, match="train: lora"):
        _cfg(lora={"rank": 4})
    with pytest.raises(ValueError, match="inputs"):
        _cfg(inputs="teacher")
    depth = {"name": "x", "model": {"source": "tiny-random-llama"}, "stages": {
        "calibrate": {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 2, "seq_len": 16},
        "score": {"type": "score", "criteria": ["block_influence"]},
        "prune": {"type": "prune", "criterion": "block_influence", "num_blocks": 1},
        "reconstruct": {"type": "reconstruct"}}}
    with pytest.raises(RecipeError, match="not units blocks"):
        validate(depth)


def test_debug_recipe_validates() -> None:
    from prunelab.recipe import load_recipe

    recipe = load_recipe(Path("recipes/debug-reconstruct.yaml"))
    assert recipe.stages["reconstruct"].sublayers == "separate"
    assert json.dumps(recipe.stages["reconstruct"].model_dump(mode="json"))


def test_token_loss_is_not_ruled_by_a_massive_token() -> None:
    """One token 10^3× larger than the rest (SmolLM2's first token): plain MSE is its error alone; ``token`` weighs
    every token's error relative to its own size, so a 10% error on small tokens shows and a tiny one on the big
    token does not; ``channel`` does the same across channels; ``skip_tokens`` leaves position 0 out."""
    want = torch.ones(1, 4, 8)
    want[0, 0] *= 1000.0
    got = want.clone()
    got[0, 0] += 10.0  # 1% of the massive token
    got[0, 1:] *= 1.1  # 10% on every other token
    mse, token = rec.Objective("mse"), rec.Objective("token")
    assert mse(got, want).item() == pytest.approx((100.0 + 3 * 0.01) / 4, rel=1e-5)
    assert token(got, want).item() == pytest.approx((1e-4 + 3 * 0.01) / 4, rel=1e-4)
    assert rec.Objective("token", skip=1)(got, want).item() == pytest.approx(0.01, rel=1e-4)
    assert rec.Objective("mse", skip=1)(got, want).item() == pytest.approx(0.01, rel=1e-4)
    scale = torch.ones(8)
    scale[3] = 1e6  # a massive channel
    wide = torch.ones(1, 2, 8)
    err = wide.clone()
    err[..., 3] += 100.0
    assert rec.Objective("mse")(err, wide).item() == pytest.approx(10000 / 8)
    assert rec.Objective("channel", scale=scale)(err, wide).item() == pytest.approx(0.01 / 8)
    with pytest.raises(ValueError, match="channel"):
        rec.Objective("channel")


def test_cosine_schedule_decays_to_zero() -> None:
    assert [rec.lr_factor("constant", t, 4) for t in range(4)] == [1.0] * 4
    got = [rec.lr_factor("cosine", t, 4) for t in range(5)]
    assert got[0] == 1.0 and got[2] == pytest.approx(0.5) and got[4] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("settings", [
    {"loss": "token"},
    {"loss": "channel", "skip_tokens": 1},
    {"loss": "token", "schedule": "cosine", "sublayers": "separate"},
])
def test_normalized_losses_lower_every_block_loss(settings: dict, tmp_path: Path) -> None:
    """Each new objective trains: every block's own loss falls, the steps run, and the record says which loss."""
    dense, pruned = _pair()
    info = rec.reconstruct(pruned, dense, _windows(), _cfg(inputs="dense", **settings), tmp_path, progress=False)
    assert all(b["loss_after"] < b["loss_before"] for b in info["blocks"]), info["blocks"]
    # token / channel losses of predicting zeros are 1 (per token / per channel relative), so relative = loss
    assert all(b["target_mean_square"] == pytest.approx(1.0, rel=1e-4) for b in info["blocks"])


def test_settings_change_the_result_and_the_checkpoint_hash(tmp_path: Path) -> None:
    """loss, schedule and skip_tokens each change the trained weights, so a resumed run never reuses another's block."""
    dense, pruned = _pair()
    ids = _windows()
    outs = {}
    for name, kw in {"mse": {}, "token": {"loss": "token"}, "cosine": {"schedule": "cosine"},
                     "skip": {"skip_tokens": 2}}.items():
        model = copy.deepcopy(pruned)
        outs[name] = (model, rec.reconstruct(model, dense, ids, _cfg(inputs="dense", **kw), tmp_path / name,
                                             progress=False)["settings_hash"])
    names = list(outs)
    assert len({outs[n][1] for n in names}) == len(names)
    for a in names:
        for b in names[names.index(a) + 1:]:
            assert not _same(outs[a][0], outs[b][0], 1e-7), (a, b)


def test_skip_tokens_checked_before_training(tmp_path: Path) -> None:
    dense, pruned = _pair()
    with pytest.raises(ValueError, match="skip_tokens: 32 leaves none"):
        rec.reconstruct(pruned, dense, _windows(8, 32), _cfg(skip_tokens=32), tmp_path, progress=False)
    with pytest.raises(ValueError, match="skip_tokens"):
        _cfg(skip_tokens=16, data={"source": {"path": "tests/data/tiny_corpus.txt"}, "seq_len": 16})
    with pytest.raises(ValueError, match="loss"):
        _cfg(loss="cosine")
    from prunelab.recipe import RecipeError, validate

    calibrate = {"type": "calibrate", "source": {"path": "tests/data/tiny_corpus.txt"}, "num_samples": 2, "seq_len": 16}
    recipe = {"name": "x", "model": {"source": "tiny-random-llama"}, "stages": {
        "calibrate": calibrate,
        "score": {"type": "score", "units": "width", "criteria": ["flap"]},
        "prune": {"type": "prune", "units": "width", "criterion": "flap", "ratio": 0.2},
        "reconstruct": {"type": "reconstruct", "skip_tokens": 16}}}
    with pytest.raises(RecipeError, match="skip_tokens: 16 leaves none"):
        validate(recipe)
