"""The observers: one per statistic a criterion may need (registered in ``prunelab.stages.calibration.needs``).

An observer sees the calibration data through events that both pipelines produce, in different orders (``full``:
batch by batch, every block inside; ``sequential``: block by block, every batch inside), so one observer serves
both and gives the same sums:

- ``hooks(i, layer)``: module hooks attached while block ``i`` runs (projection inputs, mid-layer residual);
- ``after_block(i, x_in, x_out, batch)``: the hidden states entering and leaving block ``i`` on one batch;
- ``after_batch(states, ids, batch)``: every boundary state of one batch (``full`` only: observers that need
  them all at once are refused by the sequential pipeline through their registered ``refused`` reason);
- ``block_done(i, x_in, inputs)`` and ``after_pass(final, ids)``: ``sequential`` only, block ``i`` still
  resident and the hooks off (``x_in(b)``: batch b's state entering it, ``inputs(x)``: its ``BlockInputs``), then
  after the last block with the final norm and head resident (``final(b)``: batch b's last boundary state);
- ``backward(model, ids)``: one forward+backward of the calibration loss (``full`` only);
- ``finish()``: after the last batch.

``FORWARD`` observers watch module inputs: in ``full`` they ride the model's own forward (the gradient pass when
there is one), the others ride the block-boundary pass. Sums are float64 and added in batch order in both
pipelines, so equal inputs give equal statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

import prunelab.stages.arch as arch_tables  # its tables are derived on every read
from prunelab.stages.arch.base import OBSERVED_ROLES, STAT_KEYS, ArchAdapter
from prunelab.stages.calibration.backward import fold_gradients
from prunelab.stages.calibration.blocks import advance, candidates_nll, removal_nll_batch
from prunelab.stages.calibration.channels import ChannelStats
from prunelab.stages.calibration.experts import expert_hook, start_expert_observers
from prunelab.stages.calibration.needs import resolve
from prunelab.stages.calibration.stats import CalibrationStats, accumulate_gradients
from prunelab.stages.calibration.width import COMPENSATED, OBSERVED


class Observer:
    """The base: every event a no-op. Subclasses set up their ``stats`` fields in ``__init__``."""

    FORWARD: ClassVar[bool] = False  # watches module inputs (full: during the model's own forward)
    STATES: ClassVar[bool] = False  # reads block-boundary states (full: during the block-boundary pass)
    BACKWARD: ClassVar[bool] = False  # runs the forward+backward of the calibration loss

    def __init__(self, stats: CalibrationStats, adapter: ArchAdapter, needs: frozenset[str]) -> None:
        self.stats, self.adapter, self.needs = stats, adapter, needs

    def hooks(self, index: int, layer: torch.nn.Module) -> list[Any]:
        return []

    def after_block(self, index: int, x_in: torch.Tensor, x_out: torch.Tensor, batch: int) -> None:
        pass

    def after_batch(self, states: list[torch.Tensor], ids: torch.Tensor, batch: int) -> None:
        pass

    def block_done(self, index: int, x_in: Callable[[int], torch.Tensor], inputs: Callable[[torch.Tensor], Any]) -> None:
        pass

    def after_pass(self, final: Callable[[int], torch.Tensor], ids: list[torch.Tensor]) -> None:
        pass

    def backward(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        pass

    def finish(self) -> None:
        pass


def start_observers(needs: Iterable[str], stats: CalibrationStats, adapter: ArchAdapter) -> list[Observer]:
    """One observer per need (and per need those require), each set up on ``stats``, requirements first."""
    specs = resolve(needs)
    names = frozenset(s.name for s in specs)
    return [spec.load()(stats, adapter, names) for spec in specs]


class MarkerObserver(Observer):
    """A need that changes what another observer does (``fisher``, ``hidden`` → the gradient observer) or that a
    criterion serves itself (``calibration``): nothing of its own to collect."""


class BoundaryObserver(Observer):
    """ShortGPT's Σ_t cos(x_i, x_{i+1}) and Gromov et al.'s Σ_samples arccos(cos(x_ℓ,T, x_ℓ+n,T))/π for every pair of
    boundaries at the last token T; the last-token states (normalised, [L+1, B, H] per batch) wait for ``finish``."""

    STATES = True

    def __init__(self, stats: CalibrationStats, adapter: ArchAdapter, needs: frozenset[str]) -> None:
        super().__init__(stats, adapter, needs)
        n = stats.num_blocks
        stats.bi_cos_sum = torch.zeros(n, dtype=torch.float64)
        stats.angular_sum = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        self.last: dict[int, list[torch.Tensor | None]] = {}

    def after_block(self, index: int, x_in: torch.Tensor, x_out: torch.Tensor, batch: int) -> None:
        a = torch.nn.functional.normalize(x_in.float(), dim=-1)
        b = torch.nn.functional.normalize(x_out.float(), dim=-1)
        assert self.stats.bi_cos_sum is not None
        self.stats.bi_cos_sum[index] += (a * b).sum(-1).sum().cpu().double()
        if index == 0:
            self.stats.bi_tokens += a.shape[0] * a.shape[1]
        last = self.last.setdefault(batch, [None] * (self.stats.num_blocks + 1))
        last[index], last[index + 1] = a[:, -1].clone(), b[:, -1].clone()

    def finish(self) -> None:
        assert self.stats.angular_sum is not None
        for batch in sorted(self.last):
            last = torch.stack(self.last[batch])  # type: ignore[arg-type]  # [L+1, B, H]
            cos = torch.einsum("abh,cbh->acb", last, last).clamp(-1.0, 1.0)  # [L+1, L+1, B]
            self.stats.angular_sum += (torch.arccos(cos) / math.pi).sum(-1).cpu().double()
            self.stats.angular_samples += last.shape[1]
        self.last.clear()


class SublayerObserver(Observer):
    """Σ_t cos(X, Y) for each attention and MLP sublayer (He et al., arXiv 2406.15786): X the residual stream entering
    it, Y the one leaving it — the layer's input, the residual between its sublayers (a pre-hook on the adapter's
    ``MID_RESIDUAL`` module) and the layer's output."""

    STATES = True

    def __init__(self, stats: CalibrationStats, adapter: ArchAdapter, needs: frozenset[str]) -> None:
        super().__init__(stats, adapter, needs)
        if not adapter.SUBLAYER_REMOVAL:  # e.g. Gemma's post-norms: the MID_RESIDUAL module does not see the stream
            raise ValueError(f"sublayer statistics (sublayer_cosine): not defined for {adapter.family} "
                             f"({adapter.model.config.model_type}); supported: {', '.join(arch_tables.SUBLAYER_FAMILIES)} — use a "
                             "block criterion such as block_influence")
        stats.sublayer_cos_sum = torch.zeros(stats.num_blocks, 2, dtype=torch.float64)
        self.mids: list[torch.Tensor] = []  # in block order; each block's is read right after the block's states

    def hooks(self, index: int, layer: torch.nn.Module) -> list[Any]:
        def grab(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.mids.append(args[0] if args else kwargs["hidden_states"])

        return [layer.get_submodule(self.adapter.MID_RESIDUAL).register_forward_pre_hook(grab, with_kwargs=True)]

    def after_block(self, index: int, x_in: torch.Tensor, x_out: torch.Tensor, batch: int) -> None:
        if not self.mids:
            raise RuntimeError(f"sublayer statistics: no mid-layer residual seen for block {index}")
        cos = torch.nn.functional.cosine_similarity
        dtype = torch.promote_types(x_in.dtype, torch.float32)  # at least float32 (bf16 models), float64 stays
        x, m, y = x_in.to(dtype), self.mids.pop(0).to(dtype), x_out.to(dtype)
        assert self.stats.sublayer_cos_sum is not None
        self.stats.sublayer_cos_sum[index, 0] += cos(x, m, dim=-1).sum().item()
        self.stats.sublayer_cos_sum[index, 1] += cos(m, y, dim=-1).sum().item()
        if index == 0:
            self.stats.sublayer_tokens += x_in.shape[0] * x_in.shape[1]


class RemovalNLLObserver(Observer):
    """The calibration NLL with each block removed, from the batch's cached boundary states (the wavefront of
    ``prunelab.stages.calibration.blocks.removal_nll_batch``), and the dense NLL beside it.

    ``full``: per batch, from all its boundary states at once. ``sequential``: the same wavefront one block at a
    time — candidate p's state (block p skipped) is carried through every later block while that block is
    resident, so it holds up to L states per batch (L × the boundary cache, in memory)."""

    STATES = True

    def __init__(self, stats: CalibrationStats, adapter: ArchAdapter, needs: frozenset[str]) -> None:
        super().__init__(stats, adapter, needs)
        stats.removal_nll = torch.zeros(stats.num_blocks, dtype=torch.float64)
        self.running: dict[int, list[torch.Tensor]] = {}  # sequential: batch → candidates' states
        self.blocks: list[int] = []  # sequential: the blocks run, in order (SLEB's later rounds skip removed ones)

    def after_block(self, index: int, x_in: torch.Tensor, x_out: torch.Tensor, batch: int) -> None:
        self.running.setdefault(batch, [])

    def block_done(self, index: int, x_in: Callable[[int], torch.Tensor], inputs: Callable[[torch.Tensor], Any]) -> None:
        self.blocks.append(index)
        for b, running in self.running.items():
            x = x_in(b)
            self.running[b] = advance(self.adapter, index, running, inputs(x)) + [x]

    def after_pass(self, final: Callable[[int], torch.Tensor], ids: list[torch.Tensor]) -> None:
        assert self.stats.removal_nll is not None
        for b in sorted(self.running):
            self.stats.removal_nll[self.blocks] += torch.tensor(
                candidates_nll(self.adapter, self.running.pop(b), ids[b]), dtype=torch.float64)
            dense, count = self.adapter.nll_sum(final(b), ids[b])
            self.stats.dense_nll += dense
            self.stats.nll_tokens += count

    def after_batch(self, states: list[torch.Tensor], ids: torch.Tensor, batch: int) -> None:
        kept = list(range(self.stats.num_blocks))
        assert self.stats.removal_nll is not None
        self.stats.removal_nll += torch.tensor(removal_nll_batch(self.adapter, states, kept, ids), dtype=torch.float64)
        dense, count = self.adapter.nll_sum(states[-1], ids)
        self.stats.dense_nll += dense
        self.stats.nll_tokens += count


class ActivationObserver(Observer):
    """Per layer and observed projection (``STAT_KEYS``), float64 sums of the input channels (``ChannelStats``); on
    mixture-of-experts layers the routing statistics (``prunelab.stages.calibration.experts``)."""

    FORWARD = True

    def __init__(self, stats: CalibrationStats, adapter: ArchAdapter, needs: frozenset[str]) -> None:
        super().__init__(stats, adapter, needs)
        for name in OBSERVED:
            stats.inputs[name] = [ChannelStats() for _ in range(stats.num_blocks)]
        stats.experts = start_expert_observers(adapter)

    def hooks(self, index: int, layer: torch.nn.Module) -> list[Any]:
        handles = []
        for role in OBSERVED_ROLES:
            if role not in self.adapter.LINEARS:  # MoE layers: no dense MLP linear (experts are observed below)
                continue
            target = self.stats.inputs[STAT_KEYS[role]][index]
            handles.append(self.adapter.linear(layer, role).register_forward_pre_hook(
                lambda _m, args, target=target: target.add(args[0])))
        if self.stats.experts:
            handles += expert_hook(self.adapter, layer, self.stats.experts[index])
        return handles


class HessianObserver(Observer):
    """XᵀX of the o_proj and down_proj inputs (optimal compensation's H), kept by the activation observer's sums."""

    def __init__(self, stats: CalibrationStats, adapter: ArchAdapter, needs: frozenset[str]) -> None:
        super().__init__(stats, adapter, needs)
        for name in COMPENSATED:
            for s in stats.inputs[name]:
                s.keep_gram = True


class GradientObserver(Observer):
    """Σ_b ∂L_b/∂w (and Σ_b (∂L_b/∂w)² with ``fisher``) of the decoder layers' weights (every parameter with
    ``hidden``). ``full``: one forward+backward of the calibration loss per batch (``accumulate_gradients``).
    ``sequential``: the block-wise backward (``prunelab.stages.calibration.backward``) folds each block's gradients
    per batch (``fold``), block by block from the head down; ``finish`` puts the sums back in the model's parameter
    order, so both pipelines leave the same tables."""

    BACKWARD = True

    def __init__(self, stats: CalibrationStats, adapter: ArchAdapter, needs: frozenset[str]) -> None:
        super().__init__(stats, adapter, needs)
        self.every_parameter = "hidden" in needs
        self.names = [n for n, _ in adapter.model.named_parameters()]  # before a streamed load unties anything

    def backward(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        accumulate_gradients(model, ids, self.stats, squares="fisher" in self.needs,
                             every_parameter=self.every_parameter)

    def fold(self, named: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """One batch's gradients of these parameters added to the sums (and squares), then cleared."""
        fold_gradients(named, self.stats.grad_sum, self.stats.grad_sq_sum if "fisher" in self.needs else None)

    def batches_done(self, count: int) -> None:
        self.stats.grad_batches += count

    def finish(self) -> None:
        for table in (self.stats.grad_sum, self.stats.grad_sq_sum):
            if not isinstance(table, dict):  # spilled to disk (a streamed model): reordering would load every tensor
                continue
            ordered = {n: table[n] for n in self.names if n in table}
            table.clear()
            table.update(ordered)
