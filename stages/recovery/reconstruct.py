"""Block-local reconstruction: each pruned block trained to reproduce the DENSE block's output, one block at a time.

Why: global recovery (LoRA distillation through the whole model) is the slow part of pruning on a CPU, and it needs
the whole model resident with its activations. Matching block i of the pruned model to block i of the dense model
on calibration activations needs one block (of each model) resident and converges in few steps, since each block
only has to undo its own pruning (arXiv 2510.14444: block-wise reconstruction after structured pruning, attention
and MLP reconstructed separately). Optimal compensation is its closed-form linear special case (only the output
projections, one linear least-squares problem each); here every kept weight of the block may move.

The loop, for block i in order (the sequential calibration pipeline's order, with its ``BoundaryCache``):
- the dense block i runs on the dense inputs D_i: its outputs Y_i are the targets and D_{i+1};
- the student's inputs X_i are its own block-i inputs P_i (``inputs: pruned``: the outputs of the already
  reconstructed blocks 0..i-1, so block i also corrects the error that reaches it) or D_i (``inputs: dense``);
- Adam on the loss (``mse``, or per token / per channel relative: :class:`Objective`) of block_i(X_i) vs Y_i for
  ``steps`` steps of ``batch_size`` windows drawn by a generator seeded per
  block; ``sublayers: separate`` first trains the attention's parameters to match the dense residual stream
  after attention (the input of ``post_attention_layernorm``), then the MLP's to match the block output;
- the trained block runs once more on P_i, giving P_{i+1}; its weights go to ``blocks/block-NNN.safetensors``
  with a JSON record (settings hash, losses) written last, so a killed run resumes at the next block.

The teacher's blocks come through a ``BlockWeights`` (``prunelab.stages.calibration.sequential``): resident, or read
from safetensors into a meta skeleton one block at a time, so the dense model never has to be in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from prunelab.stages.arch import adapter_for
from prunelab.stages.arch.base import ArchAdapter, BlockInputs
from prunelab.stages.calibration.sequential import BlockWeights, BoundaryCache, ResidentWeights
from prunelab.stages.core.files import atomic_write_json
from prunelab.stages.evaluation.memory import peak_memory_mb
from prunelab.stages.recovery.fisher import output_fishers

log = logging.getLogger(__name__)

BLOCKS_DIR = "blocks"


class _StopAtMid(Exception):
    """Raised by the mid-residual hook: the attention phase needs nothing after the attention sublayer."""


class LoraDelta(nn.Module):
    """W + (alpha / r)·B·A as a parametrization of a linear's weight: B starts at zero, so training starts from W."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator,
                 like: torch.Tensor) -> None:
        super().__init__()
        a = torch.empty(rank, in_features).uniform_(-1.0, 1.0, generator=generator) / math.sqrt(in_features)
        self.A = nn.Parameter(a.to(like))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=like.dtype, device=like.device))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A)


@dataclass
class Phase:
    """One optimisation of a block: which parameters move and which output they match."""

    name: str  # "block" | "attention" | "mlp"
    prefixes: tuple[str, ...]  # parameter names inside the layer that train (empty: all)
    mid: bool  # the target is the residual stream after attention (not the block output)


def phases(adapter: ArchAdapter, sublayers: str) -> list[Phase]:
    """``together``: the whole block on its output; ``separate``: attention (and its norm) on the residual after
    attention, then the MLP (and its norm) on the block output."""
    if sublayers == "together":
        return [Phase("block", (), False)]
    # every norm that serves only the sublayer trains with it (two for GLM-4's sandwich norms)
    return [Phase("attention", (adapter.ATTN + ".", *(n + "." for n in adapter.sublayer_norms("attention"))), True),
            Phase("mlp", (adapter.MLP + ".", *(n + "." for n in adapter.sublayer_norms("mlp"))), False)]


def fingerprint(model: nn.Module, windows: torch.Tensor) -> str:
    """Shapes and sums of every parameter and of the calibration windows: a checkpointed block is reused only for
    the same pruned model and data."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{float(p.double().sum()):.10e}".encode())
    h.update(f"{tuple(windows.shape)}{int(windows.sum())}".encode())
    return h.hexdigest()[:16]


def settings_hash(settings: dict[str, Any], model_print: str, seed: int) -> str:
    return hashlib.sha256(f"{json.dumps(settings, sort_keys=True)}|{model_print}|{seed}".encode()).hexdigest()[:16]


def block_files(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / BLOCKS_DIR / f"block-{index:03d}.safetensors", folder / BLOCKS_DIR / f"block-{index:03d}.json"


def saved_block(folder: Path, index: int, want_hash: str | None) -> dict[str, Any] | None:
    """The record of a finished block (its JSON is written after its weights), if its hash matches."""
    weights, record = block_files(folder, index)
    if not (weights.is_file() and record.is_file()):
        return None
    info = json.loads(record.read_text())
    return info if want_hash is None or info.get("hash") == want_hash else None


def save_block(folder: Path, index: int, layer: nn.Module, info: dict[str, Any]) -> None:
    """Weights to a temporary name, renamed; the JSON record last (its presence means the block is whole)."""
    weights, record = block_files(folder, index)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    atomic_write_json(record, info)


def load_block(folder: Path, index: int, layer: nn.Module) -> None:
    weights, _ = block_files(folder, index)
    state = load_file(str(weights), device=str(next(layer.parameters()).device))
    layer.load_state_dict(state, strict=True)


def restore_blocks(model: nn.Module, folder: Path) -> int:
    """Every reconstructed block of a finished run back into ``model`` (the stage's ``restore``); how many."""
    adapter = adapter_for(model)
    for i in range(adapter.num_blocks):
        if saved_block(folder, i, None) is None:
            raise FileNotFoundError(f"{block_files(folder, i)[0]}: reconstructed block {i} is missing")
        load_block(folder, i, adapter.layers[i])
    return adapter.num_blocks


class _Runner:
    """Runs one block of one model on cached states, with the masks and rotary tables prepared once per shape."""

    def __init__(self, adapter: ArchAdapter) -> None:
        self.adapter = adapter
        self.prepared: dict[tuple[int, ...], BlockInputs] = {}

    def inputs(self, x: torch.Tensor) -> BlockInputs:
        key = tuple(x.shape[:2])
        if key not in self.prepared:
            with torch.no_grad():
                self.prepared[key] = self.adapter.prepare(x.detach())
        return self.prepared[key]

    def __call__(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.run_block(index, x, self.inputs(x))

    def mid(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention sublayer (the input of the MID_RESIDUAL module); stops there."""
        with mid_residual(self.adapter, index) as seen:
            try:
                self(index, x)
            except _StopAtMid:
                pass
        return seen[0]

    def both(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block output and the residual after attention, in one forward."""
        with mid_residual(self.adapter, index, stop=False) as seen:
            out = self(index, x)
        return out, seen[0]


@contextmanager
def mid_residual(adapter: ArchAdapter, index: int, stop: bool = True) -> Iterator[list[torch.Tensor]]:
    module = adapter.layers[index].get_submodule(adapter.MID_RESIDUAL)
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0])
        if stop:
            raise _StopAtMid

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def _stack(cache: BoundaryCache, idx: list[int]) -> torch.Tensor:
    return torch.cat([cache.get(i) for i in idx])


class Objective:
    """What a block is trained (and judged) on: the error to the dense target, positions ``skip`` on.

    Why not plain MSE alone: SmolLM2's residual stream holds a few massive activations (the first token of a window
    carries ~10^4× a typical token's mean square past the middle blocks, and two channels most of the rest), so the
    MSE's gradient is spent on them. ``token`` divides each token's squared error by the dense token's mean square;
    ``channel`` each channel's by that channel's mean square over the calibration targets (``scale``); ``fisher``
    weights each element by the dense model's squared loss gradient there (``fisher``: per-window caches,
    :mod:`prunelab.stages.recovery.fisher`), over its mean (``scale``), so uniform weights would give the MSE."""

    def __init__(self, kind: str, skip: int = 0, scale: torch.Tensor | None = None,
                 fisher: BoundaryCache | None = None) -> None:
        if kind == "channel" and scale is None:
            raise ValueError("loss: channel needs the targets' per-channel mean square")
        if kind == "fisher" and (fisher is None or scale is None):
            raise ValueError("loss: fisher needs the block output's squared gradients and their mean")
        self.kind, self.skip, self.scale, self.fisher = kind, skip, scale, fisher

    def __call__(self, got: torch.Tensor, want: torch.Tensor, idx: list[int] | None = None) -> torch.Tensor:
        g, w = got.float()[:, self.skip:], want.float()[:, self.skip:]
        err = (g - w).pow(2)
        if self.kind == "token":
            return (err.mean(-1) / w.pow(2).mean(-1).clamp_min(1e-12)).mean()
        if self.kind == "channel":
            return (err / self.scale).mean()
        if self.kind == "fisher":
            assert self.fisher is not None and idx is not None, "loss: fisher reads the windows' weights by index"
            weight = _stack(self.fisher, idx)[:, self.skip:].to(err.device)
            return (err * weight).mean() / self.scale
        return err.mean()


@torch.no_grad()
def objective(cfg: Any, y: BoundaryCache, n: int, size: int, fisher: BoundaryCache | None = None) -> Objective:
    """The stage's loss for one target cache (``channel`` reads the targets' per-channel mean square once,
    ``fisher`` the mean of the block output's weights)."""
    skip = getattr(cfg, "skip_tokens", 0)
    kind = getattr(cfg, "loss", "mse")
    scale = None
    if kind in ("channel", "fisher"):
        source = fisher if kind == "fisher" else y
        assert source is not None, "loss: fisher needs the block output's squared gradients"
        total, count = None, 0
        for idx in _chunks(n, size):
            w = _stack(source, idx).float()[:, skip:]
            part = w.pow(2).sum((0, 1)) if kind == "channel" else w.sum((0, 1))
            total = part if total is None else total + part
            count += w.shape[0] * w.shape[1]
        scale = total / max(count, 1)
        if kind == "fisher":
            scale = scale.mean().clamp_min(1e-30)  # one number: the mean weight of an element
        else:
            scale = scale.clamp_min(float(scale.mean()) * 1e-6 + 1e-12)  # a dead channel must not divide by zero
    return Objective(kind, skip, scale, fisher if kind == "fisher" else None)


@torch.no_grad()
def _eval_loss(run: Callable[[torch.Tensor], torch.Tensor], x: BoundaryCache, y: BoundaryCache, n: int,
               size: int, loss: Objective, out: BoundaryCache | None = None) -> float:
    """Mean loss over every window (optionally keeping the outputs, the next boundary)."""
    total = 0.0
    for idx in _chunks(n, size):
        got = run(_stack(x, idx))
        total += float(loss(got, _stack(y, idx), idx)) * len(idx)
        if out is not None:
            for j, w in enumerate(idx):
                out.put(w, got[j:j + 1])
    return total / n


def _trainable(layer: nn.Module, phase: Phase, train: str, rank: int, alpha: float,
               generator: torch.Generator) -> list[nn.Parameter]:
    """Turn on the gradients of the phase's weights (``weights``), or add LoRA factors to its linears (``lora``)."""
    layer.requires_grad_(False)
    chosen = [m for n, m in layer.named_modules() if not phase.prefixes or n.startswith(phase.prefixes)]
    if train == "weights":
        params = [p for n, p in layer.named_parameters() if not phase.prefixes or n.startswith(phase.prefixes)]
        for p in params:
            p.requires_grad_(True)
        return params
    params = []
    for m in chosen:
        if isinstance(m, nn.Linear) and not parametrize.is_parametrized(m):
            delta = LoraDelta(m.out_features, m.in_features, rank, alpha, generator, m.weight)
            parametrize.register_parametrization(m, "weight", delta)
            params += [delta.A, delta.B]
    return params


def _merge(layer: nn.Module) -> None:
    """LoRA factors folded into the weights (a plain linear again); gradients off."""
    for m in layer.modules():
        if isinstance(m, nn.Linear) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    layer.requires_grad_(False)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The multiplier of lr at ``step`` (0-based): 1, or a cosine from 1 at step 0 towards 0 after the last step."""
    return 0.5 * (1.0 + math.cos(math.pi * step / steps)) if schedule == "cosine" else 1.0


def _train_phase(run: _Runner, index: int, phase: Phase, x: BoundaryCache, y: BoundaryCache, n: int,
                 cfg: Any, seed: int, progress: bool, loss_fn: Objective) -> list[float]:
    """``cfg.steps`` Adam steps on the objective; batches of windows drawn by a generator seeded by (seed, block,
    phase); ``schedule: cosine`` decays the rate from lr to 0 over the phase."""
    layer = run.adapter.layers[index]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index * 101 + len(phase.name))
    params = _trainable(layer, phase, cfg.train, cfg.lora.rank, cfg.lora.alpha, gen)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    schedule = getattr(cfg, "schedule", "constant")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(schedule, t, cfg.steps))
    forward = (lambda t: run.mid(index, t)) if phase.mid else (lambda t: run(index, t))
    order: list[int] = []
    losses = []
    bar = tqdm(range(cfg.steps), desc=f"reconstruct block {index} {phase.name}", disable=not progress, leave=False)
    with torch.enable_grad():
        for _ in bar:
            while len(order) < cfg.batch_size:
                order += torch.randperm(n, generator=gen).tolist()
            idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
            loss = loss_fn(forward(_stack(x, idx)), _stack(y, idx), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    _merge(layer)
    return losses


def reconstruct(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: Any, folder: Path, *,
                seed: int = 0, resume: bool = False, progress: bool = True,
                teacher_weights: BlockWeights | None = None) -> dict[str, Any]:
    """Reconstruct every block of ``student`` (pruned, resident, trained in place) towards ``teacher`` (dense).

    ``cfg``: the stage's settings (inputs, train, sublayers, steps, batch_size, lr, lora, memory_budget_gb).
    ``windows``: LongTensor [N, L] of calibration tokens. ``folder``: where the per-block checkpoints go.
    Returns per-block losses (before/after, relative to the target's mean square) and seconds."""
    sa, ta = adapter_for(student), adapter_for(teacher)
    if sa.num_blocks != ta.num_blocks:
        raise ValueError(f"stages.reconstruct: the pruned model has {sa.num_blocks} blocks and the dense model "
                         f"{ta.num_blocks}; block-local reconstruction pairs block i with block i, so it follows a "
                         "width plan (units: width), not a depth plan")
    hidden_s, hidden_t = student.config.hidden_size, teacher.config.hidden_size
    if hidden_s != hidden_t:
        raise ValueError(f"stages.reconstruct: hidden size {hidden_s} ≠ dense {hidden_t}: a hidden-channel plan has no "
                         "dense target of the same width; prune heads/channels (attention, mlp units) instead")
    teacher_weights = teacher_weights or ResidentWeights()
    windows = windows.to(torch.long)
    n, size = windows.shape[0], cfg.batch_size
    skip = getattr(cfg, "skip_tokens", 0)
    if skip >= windows.shape[1]:
        raise ValueError(f"stages.reconstruct.skip_tokens: {skip} leaves none of the windows' {windows.shape[1]} "
                         "tokens in the loss; lower it (1 skips the first, attention-sink token)")
    dump = cfg.model_dump(mode="json")
    for key in ("type", "memory_budget_gb", "offload_dir"):
        dump.pop(key, None)
    want = settings_hash(dump, fingerprint(student, windows), seed)
    run_s, run_t = _Runner(sa), _Runner(ta)
    plan = phases(sa, cfg.sublayers)
    folder.mkdir(parents=True, exist_ok=True)
    budget = cfg.memory_budget_gb * 2**30 / 5  # up to five boundaries alive: D_i, D_{i+1}, mid, P_i, P_{i+1}
    tmp = folder / "boundaries"
    tmp.mkdir(exist_ok=True)
    student.requires_grad_(False)
    was_training = student.training
    student.eval()
    teacher.eval()
    dense = BoundaryCache(budget, tmp, "d0")
    own = BoundaryCache(budget, tmp, "p0") if cfg.inputs == "pruned" else None
    blocks: list[dict[str, Any]] = []
    fishers: list[BoundaryCache] = []
    t_start = time.perf_counter()
    try:
        with torch.no_grad():
            with teacher_weights.embedding(ta):
                for idx in _chunks(n, size):
                    x = ta.embed(windows[idx])
                    for j, w in enumerate(idx):
                        dense.put(w, x[j:j + 1])
            if own is not None:
                for idx in _chunks(n, size):
                    x = sa.embed(windows[idx])
                    for j, w in enumerate(idx):
                        own.put(w, x[j:j + 1])
        if getattr(cfg, "loss", "mse") == "fisher":  # one dense gradient pass: every block output's weights
            fishers = output_fishers(ta, windows, _chunks(n, size), teacher_weights, run_t.inputs, budget, tmp,
                                     progress)
        for i in tqdm(range(sa.num_blocks), desc="reconstruct", disable=not progress):
            t0 = time.perf_counter()
            target, mid = BoundaryCache(budget, tmp, f"d{i + 1}"), BoundaryCache(budget, tmp, f"m{i}")
            need_mid = any(p.mid for p in plan)
            with torch.no_grad(), teacher_weights.block(ta, i):
                for idx in _chunks(n, size):
                    out, m = run_t.both(i, _stack(dense, idx)) if need_mid else (run_t(i, _stack(dense, idx)), None)
                    for j, w in enumerate(idx):
                        target.put(w, out[j:j + 1])
                        if m is not None:
                            mid.put(w, m[j:j + 1])
            x = own if own is not None else dense
            layer = sa.layers[i]
            loss = objective(cfg, target, n, size, fishers[i] if fishers else None)
            mid_loss = objective(cfg, mid, n, size) if need_mid else loss
            record = saved_block(folder, i, want) if resume else None
            if record is not None:
                load_block(folder, i, layer)
                info = {**record, "resumed": True}
            else:
                before = _eval_loss(lambda t: run_s(i, t), x, target, n, size, loss)
                square = _eval_loss(torch.zeros_like, target, target, n, size, loss)  # the loss of predicting 0
                curves: dict[str, list[float]] = {}
                initial = {k: v.clone() for k, v in layer.state_dict().items()}
                if before > 0.0:  # an unpruned block on the dense inputs: nothing to learn, leave it bit for bit
                    for phase in plan:
                        y = mid if phase.mid else target
                        curves[phase.name] = _train_phase(run_s, i, phase, x, y, n, cfg, seed, progress,
                                                          mid_loss if phase.mid else loss)
                info = {"hash": want, "block": i, "target_mean_square": square, "loss_before": before,
                        "relative_before": before / (square or 1.0),
                        "steps": {k: len(v) for k, v in curves.items()},
                        "first_step_loss": {k: v[0] for k, v in curves.items() if v},
                        "last_step_loss": {k: v[-1] for k, v in curves.items() if v}}
            following = BoundaryCache(budget, tmp, f"p{i + 1}") if own is not None else None
            after = _eval_loss(lambda t: run_s(i, t), x, target, n, size, loss, following)
            if record is None and after > info["loss_before"]:  # overshot (lr too high): keep the block as it came
                layer.load_state_dict(initial)
                if following is not None:
                    following.clear()
                log.warning(f"reconstruct block {i}: loss rose {info['loss_before']:.5g} → {after:.5g}; block kept as "
                            "it was (lower lr or more steps)")
                after = _eval_loss(lambda t: run_s(i, t), x, target, n, size, loss, following)
                info["reverted"] = True
            if record is None:
                info.update(loss_after=after, relative_after=after / (info["target_mean_square"] or 1.0),
                            seconds=round(time.perf_counter() - t0, 3))
                save_block(folder, i, layer, info)
            kind = getattr(cfg, "loss", "mse")
            log.info(f"reconstruct block {i}: {kind} loss {info['loss_before']:.5g} → {after:.5g} "
                     f"({info['relative_before']:.3%} → {info['relative_after']:.3%} of predicting zeros)"
                     + (" [restored]" if record is not None else ""))
            blocks.append({k: v for k, v in info.items() if k != "hash"})
            dense.clear()
            mid.clear()
            if fishers:
                fishers[i].clear()
            dense = target
            if own is not None and following is not None:
                own.clear()
                own = following
    finally:
        dense.clear()
        for f in fishers:
            f.clear()
        if own is not None:
            own.clear()
        student.train(was_training)
    return summary(blocks, time.perf_counter() - t_start, windows, cfg.batch_size, want)


def summary(blocks: list[dict[str, Any]], seconds: float, windows: torch.Tensor, batch_size: int,
            want: str) -> dict[str, Any]:
    """The stage's outputs, in the keys the run's report reads for any recovery (``steps``, ``first_loss`` and
    ``final_loss`` — here the mean over blocks of the loss relative to the loss of predicting zeros —,
    ``tokens_per_s``: tokens of training forwards per second of the whole stage, passes included)."""
    steps = sum(sum(b["steps"].values()) for b in blocks)
    seq_len = int(windows.shape[1])
    return {"method": "reconstruct", "steps": steps, "first_loss": sum(b["relative_before"] for b in blocks) / len(blocks),
            "final_loss": sum(b["relative_after"] for b in blocks) / len(blocks), "seconds": round(seconds, 2),
            "tokens_per_step": batch_size * seq_len,
            "tokens_per_s": round(steps * batch_size * seq_len / seconds, 1) if seconds > 0 else None,
            "windows": int(windows.shape[0]), "calibration_tokens": int(windows.numel()), "settings_hash": want,
            "peak_memory_mb": peak_memory_mb(), "blocks": blocks}
