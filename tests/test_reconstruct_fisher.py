"""Block-local reconstruction's ``loss: fisher`` (BRECQ Eq. 10): the weights are the dense model's squared loss
gradients at every block output, computed block by block; the loss is the weighted MSE; it trains."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from prunelab.stages.arch import adapter_for
from prunelab.stages.calibration.sequential import ResidentWeights, SafetensorsWeights, skeleton
from prunelab.stages.io.tiny import tiny_llama
from prunelab.stages.recovery import reconstruct as rec
from prunelab.stages.recovery.fisher import output_fishers
from prunelab.stages.reconstruct import ReconstructConfig


def _windows(n: int = 6, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(seed))


def _autograd_fishers(model: torch.nn.Module, windows: torch.Tensor, chunks: list[list[int]],
                      dtype: torch.dtype) -> list[torch.Tensor]:
    """(∂L/∂z_i)² per window by one ordinary backward through the whole model (hooks keep each block output), L the
    batch-mean next-token loss × the batch's window count — the reference, independent of the block-wise walk."""
    model = copy.deepcopy(model).to(dtype)
    layers = adapter_for(model).layers
    out: list[torch.Tensor] = [torch.zeros(0)] * len(layers)
    per_block: list[list[torch.Tensor]] = [[] for _ in layers]
    for idx in chunks:
        kept: list[torch.Tensor] = []

        def hook(_m, _a, o, kept=kept):
            h = o[0] if isinstance(o, tuple) else o
            h.retain_grad()
            kept.append(h)

        handles = [layer.register_forward_hook(hook) for layer in layers]
        ids = windows[idx]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for h in handles:
            h.remove()
        for i, h in enumerate(kept):
            per_block[i].append((h.grad.double() * len(idx)).pow(2))
        model.zero_grad(set_to_none=True)
    for i in range(len(layers)):
        out[i] = torch.cat(per_block[i])
    return out


@pytest.mark.parametrize("streamed", [False, True])
def test_block_wise_fishers_equal_an_ordinary_backward(streamed: bool, tmp_path: Path) -> None:
    """Every block output's weights from the block-wise walk (resident, or the dense model read block by block from
    safetensors with every state on disk) equal those of one backward through the whole model, within 2× the
    float32-vs-float64 floor of the reference itself; uneven batches (6 windows in batches of 4) included."""
    torch.manual_seed(0)
    dense = tiny_llama(num_layers=5, heads=4, kv_heads=2, tie=True).eval()
    windows = _windows()
    chunks = [[0, 1, 2, 3], [4, 5]]
    ref64 = _autograd_fishers(dense, windows, chunks, torch.float64)
    ref32 = _autograd_fishers(dense, windows, chunks, torch.float32)
    floor = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ref32, ref64, strict=True))
    if streamed:
        dense.save_pretrained(tmp_path / "dense")
        model, weights, budget = skeleton(tmp_path / "dense"), SafetensorsWeights(tmp_path / "dense"), 0.0
    else:
        model, weights, budget = dense, ResidentWeights(), 1e9
    adapter = adapter_for(model)
    runner = rec._Runner(adapter)
    fishers = output_fishers(adapter, windows, chunks, weights, runner.inputs, budget, tmp_path, progress=False)
    assert len(fishers) == adapter.num_blocks
    for i, cache in enumerate(fishers):
        got = torch.cat([cache.get(w) for w in range(len(windows))]).double()
        gap = ((got - ref64[i]).abs().max() / ref64[i].abs().max()).item()
        assert gap <= 2 * floor + 1e-6, (i, gap, floor)
        cache.clear()
    assert not list(tmp_path.glob("fisher-*.bin"))


def test_fisher_objective_weighs_each_element() -> None:
    """Uniform weights give the MSE; a weight on one element makes its error count that many times."""
    from prunelab.stages.calibration.sequential import BoundaryCache

    want = torch.zeros(2, 3, 4)
    got = want.clone()
    got[0, 1, 2] = 1.0
    got[1, 0, 0] = 1.0
    cache = BoundaryCache(1e9, Path("."), "w")
    for w in range(2):
        cache.put(w, torch.ones(1, 3, 4))
    uniform = rec.Objective("fisher", scale=torch.tensor(1.0), fisher=cache)
    assert uniform(got, want, [0, 1]).item() == pytest.approx(rec.Objective("mse")(got, want).item())
    heavy = torch.ones(1, 3, 4)
    heavy[0, 1, 2] = 9.0
    cache.put(0, heavy)
    assert rec.Objective("fisher", scale=torch.tensor(1.0), fisher=cache)(got, want, [0, 1]).item() == \
        pytest.approx(10.0 / 24)
    with pytest.raises(ValueError, match="fisher"):
        rec.Objective("fisher")


def test_fisher_reconstruction_trains_and_lowers_every_block_loss(tmp_path: Path) -> None:
    """FLAP + optimal compensation at 25% of a tiny Llama, then ``loss: fisher``: every block's weighted loss falls,
    the weights change, and the settings hash differs from the token loss's."""
    import prunelab

    dense = tiny_llama(num_layers=4, heads=4, kv_heads=2, tie=True).eval()
    pruned = copy.deepcopy(dense)
    prunelab.prune(pruned, calibration=_windows(8, 32, seed=1), criterion="flap", units="width", ratio=0.25,
                   allocation="global", compensation="optimal")
    start = copy.deepcopy(pruned)
    cfg = ReconstructConfig(type="reconstruct", steps=8, batch_size=4, lr=1e-3, loss="fisher")
    info = rec.reconstruct(pruned, dense, _windows(8, 32), cfg, tmp_path / "f", progress=False)
    assert all(b["loss_after"] < b["loss_before"] for b in info["blocks"]), info["blocks"]
    assert any((a - b).abs().max() > 0 for a, b in zip(pruned.state_dict().values(), start.state_dict().values()))
    other = rec.reconstruct(copy.deepcopy(start), dense, _windows(8, 32),
                            cfg.model_copy(update={"loss": "token"}), tmp_path / "t", progress=False)
    assert other["settings_hash"] != info["settings_hash"]
    assert not list((tmp_path / "f" / "boundaries").glob("*.bin"))


def test_fisher_with_separate_sublayers_is_refused() -> None:
    with pytest.raises(ValueError, match="sublayers: together with loss: fisher"):
        ReconstructConfig(type="reconstruct", loss="fisher", sublayers="separate")
