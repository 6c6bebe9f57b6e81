"""Sublayer importance as what removal costs: the calibration NLL with an attention or MLP sublayer removed.

The unit is He et al.'s (arXiv 2406.15786) whole attention / MLP sublayer; the measure is not their cosine but the
loss itself, as Shortened LLaMA's PPL criterion (Kim et al., arXiv 2402.02834, Sec. 3.2) and SLEB (Song et al., arXiv
2402.09025, Algorithm 1) measure it for whole blocks:

- ``sublayer_ppl`` (one-shot): ΔNLL_u = NLL(model ∖ u) − NLL(model), per calibration token, for every sublayer u.
- ``sublayer_sleb`` (iterative): SLEB's greedy at sublayer granularity — each round, remove the sublayer whose
  removal from the *already pruned* model costs least, until the later prune stage's target is met.

Why per parameter (``objective: per_param``, the default): the target is a parameter count and an MLP sublayer of a
Llama layout is ~3× an attention sublayer (SmolLM2: 2.65M vs 0.885M), so ranking the raw ΔNLL favours attention and
ranking the cosine (a scale that ignores size) mixes both arbitrarily. ΔNLL / params is the greedy ratio rule of a
knapsack: the cheapest loss per parameter removed first. ``objective: absolute`` ranks raw ΔNLL (SLEB's own rule,
right when every unit has the same size).

The model is a sequence of residual updates u_1 … u_2L (attention_0, mlp_0, attention_1, …). The state entering every
kept sublayer is cached per calibration batch, so removing u_q re-runs only u_{q+1} … and the head; a sublayer runs
alone as its decoder layer with the other sublayer swapped for the no-op that removal would put there
(``prunelab.stages.arch.noop``), so any family that can lose a sublayer is served by its own layer ``forward``.

Tractability (``sublayer_sleb``): one exact round costs ~n/2 model forwards (n candidates, each running half the
model on average, plus the head). Two economies, both settings: candidates never scored before are first *screened*
on a fraction of the calibration windows (successive halving's first rung: only their estimate is noisier), and the
rounds are *lazy* (Minoux's accelerated greedy): the candidate with the lowest estimate is re-scored on all windows
and taken once its fresh ΔNLL is no higher than every other estimate — exact when removal costs only grow as the
model shrinks (stale values are then lower bounds), the usual case; ``min_fresh`` re-scores a few more every round
as a guard. ``lazy: false, screen: 1.0`` is SLEB's Algorithm 1 exactly (every candidate re-scored every round).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from prunelab.stages.arch.noop import NoAttention, NoMLP
from prunelab.stages.calibration.blocks import batches
from prunelab.stages.calibration.streamed import weights_of
from prunelab.stages.core.counts import ratio_to_params
from prunelab.stages.criteria.base import CriterionInputs, CriterionResult
from prunelab.stages.criteria.sublayer import SublayerPPLSettings, SublayerSLEBSettings
from prunelab.stages.surgery.sublayers import sublayer_refusal

Unit = tuple[str, int]  # ("attention" | "mlp", layer index)
KEEP_TAILS = 4  # a call re-scoring at most this many candidates keeps each one's states after it (min_fresh: 3)
log = logging.getLogger(__name__)


def sublayer_sequence(adapter: Any) -> list[Unit]:
    """The present sublayers in forward order (refused, by name, for families whose layers cannot lose one)."""
    refusal = sublayer_refusal(adapter.model)
    if refusal:
        raise ValueError(refusal)
    return [(w, i) for i in range(adapter.num_blocks) for w in ("attention", "mlp")
            if adapter.has_sublayer(adapter.layers[i], w)]  # indexed: a streamed skeleton's layers stay on meta


@contextmanager
def alone(adapter: Any, layer_index: int, which: str) -> Iterator[None]:
    """Layer ``layer_index`` with its other sublayer swapped for the no-op its removal would leave (restored after)."""
    layer = adapter.layers[layer_index]
    other = "mlp" if which == "attention" else "attention"
    if not adapter.has_sublayer(layer, other):
        yield
        return
    path = adapter.MLP if other == "mlp" else adapter.ATTN
    original = layer.get_submodule(path)
    if other == "mlp":
        stand_in: torch.nn.Module = NoMLP(adapter.linear(layer, "down").out_features)
    else:
        stand_in = NoAttention(getattr(original, "layer_idx", layer_index), getattr(original, "head_dim", 0),
                               adapter.linear(layer, "o").out_features)
    parent, _, name = path.rpartition(".")
    holder = layer.get_submodule(parent) if parent else layer
    setattr(holder, name, stand_in)
    try:
        yield
    finally:
        setattr(holder, name, original)


def run_unit(adapter: Any, unit: Unit, hidden: torch.Tensor, inputs: Any) -> torch.Tensor:
    """The residual stream after sublayer ``unit`` (its layer's forward with the other sublayer a no-op)."""
    which, i = unit
    with alone(adapter, i, which):
        return adapter.run_block(i, hidden, inputs)


class SublayerWalk:
    """Cached states entering every kept sublayer, per calibration batch, and the NLL with one of them removed."""

    def __init__(self, adapter: Any, calibration: torch.Tensor, batch_size: int, kept: list[Unit],
                 progress: bool = False) -> None:
        self.adapter, self.kept, self.progress = adapter, list(kept), progress
        self.ids = [b.to(adapter.device) for b in batches(calibration, batch_size)]
        self.inputs: list[Any] = []
        self.states: list[list[torch.Tensor]] = []
        self.base: list[float] = [0.0] * len(self.ids)  # NLL sum of each batch on the current model
        with torch.inference_mode():
            for ids in self.ids:
                h = adapter.embed(ids)
                self.inputs.append(adapter.prepare(h))
                self.states.append([h])
            for b in range(len(self.ids)):
                self._forward_from(b, 0)

    def tokens(self, which: list[int]) -> int:
        return sum(self.ids[b][:, 1:].numel() for b in which)

    def _forward_from(self, b: int, q: int) -> None:
        """Recompute batch ``b``'s states after position ``q`` (the state entering ``kept[q]`` is valid)."""
        states = self.states[b][: q + 1]
        h = states[-1]
        for unit in self.kept[q:]:
            h = run_unit(self.adapter, unit, h, self.inputs[b])
            states.append(h)
        self.states[b] = states
        self.base[b] = self.adapter.nll_per_sequence(h, self.ids[b]).sum().item()

    @torch.inference_mode()
    def removal_delta(self, q: int, which: list[int], keep: bool = False) -> tuple[float, list[list[torch.Tensor]] | None]:
        """Mean per-token ΔNLL over batches ``which`` with ``kept[q]`` removed from the current model; with ``keep``,
        also the states that removal leaves after position ``q`` (so taking it costs no second pass)."""
        total, tails = 0.0, []
        for b in which:
            h = self.states[b][q]  # the removed sublayer's input goes on to the next one
            tail = []
            for unit in self.kept[q + 1 :]:
                h = run_unit(self.adapter, unit, h, self.inputs[b])
                if keep:
                    tail.append(h)
            nll = self.adapter.nll_per_sequence(h, self.ids[b]).sum().item()
            tails.append((tail, nll))
            total += nll - self.base[b]
        return total / self.tokens(which), ([t for t, _ in tails] if keep else None)

    @torch.inference_mode()
    def remove(self, q: int, tails: list[list[torch.Tensor]] | None = None) -> Unit:
        """Remove ``kept[q]`` from the walk; every batch's states after it come from ``tails`` (``removal_delta`` with
        ``keep`` on all batches) or are recomputed."""
        unit = self.kept.pop(q)
        for b in range(len(self.ids)):
            del self.states[b][q + 1 :]
            if tails is None:
                self._forward_from(b, q)
            else:
                self.states[b] += tails[b]
                self.base[b] = self.adapter.nll_per_sequence(self.states[b][-1], self.ids[b]).sum().item()
        return unit

    def nll(self) -> float:
        """Mean per-token NLL of the current model on all windows."""
        return sum(self.base) / self.tokens(list(range(len(self.ids))))

    # the questions the criteria ask, the same as ``BlockwiseSublayerWalk``'s (one layer resident)
    def deltas(self, qs: list[int], count: int, keep: bool = False, desc: str | None = None
               ) -> tuple[list[float], dict[int, list[list[torch.Tensor]]]]:
        """``removal_delta`` of each ``kept[q]`` on the first ``count`` batches, in order; with ``keep`` (and at most
        ``KEEP_TAILS`` of them, as the sequential walk), their tails."""
        out, tails = [], {}
        keep = keep and len(qs) <= KEEP_TAILS
        for q in tqdm(qs, desc=desc, disable=desc is None or not self.progress):
            delta, tail = self.removal_delta(q, list(range(count)), keep)
            out.append(delta)
            if keep:
                tails[q] = tail
        return out, tails

    def drop(self, tails: Any) -> None:
        """Tails not taken: nothing to free (they are garbage once unreferenced)."""

    def close(self) -> None:
        pass


def _params(adapter: Any) -> dict[Unit, int]:
    """``adapter.sublayer_params()``, the layers indexed, not iterated: iterating a streamed skeleton's layers inside
    the score stage reads each from disk (``layers_resident``), and counting needs only their shapes."""
    out: dict[Unit, int] = {}
    for i in range(adapter.num_blocks):
        layer = adapter.layers[i]
        for which, module in (("attention", adapter.attention(layer)), ("mlp", adapter.mlp(layer))):
            if adapter.has_sublayer(layer, which):
                norms = [layer.get_submodule(n) for n in adapter.sublayer_norms(which)]
                out[which, i] = sum(p.numel() for m in (module, *norms) for p in m.parameters())
    return out


def _value(delta: float, params: int, objective: str) -> float:
    return delta / params if objective == "per_param" else delta


def _result(adapter: Any, order: list[Unit], estimates: dict[Unit, float], extra: dict[str, Any]) -> CriterionResult:
    """Scores selection reads (higher = kept longer): the removal rank for removed sublayers, then the other candidates
    by their last estimate, then every sublayer that was no candidate (a kind not allowed, the last of a kind)."""
    n = adapter.num_blocks
    rank = {u: float(r) for r, u in enumerate(order)}
    rest = sorted((u for u in estimates if u not in rank), key=lambda u: (estimates[u], u[0] != "attention", u[1]))
    rank.update({u: float(len(order) + r) for r, u in enumerate(rest)})
    last = float(len(rank))
    attention = [rank.get(("attention", i), last) for i in range(n)]
    mlp = [rank.get(("mlp", i), last) for i in range(n)]
    return CriterionResult(scores=[a + m for a, m in zip(attention, mlp, strict=True)],
                           extra={"attention": attention, "mlp": mlp, **extra})


def _candidates(kept: list[Unit], kinds: tuple[str, ...]) -> list[int]:
    """Positions in ``kept`` that may go: an allowed kind, and never the last sublayer of a kind."""
    left = {k: sum(1 for w, _ in kept if w == k) for k in ("attention", "mlp")}
    return [q for q, (w, _) in enumerate(kept) if w in kinds and left[w] > 1]


def _walk(inp: CriterionInputs) -> Any:
    """The walk the recipe's pipeline asks for: ``SublayerWalk`` on the resident model (``full``), or one layer resident
    with the states in boundary caches (``sequential``, and always for a streamed skeleton)."""
    kept = sublayer_sequence(inp.adapter)
    if getattr(inp.pipeline, "type", "full") == "sequential" or weights_of(inp.model) is not None:
        from prunelab.stages.criteria.sublayer_blockwise import BlockwiseSublayerWalk  # lazy: cycle

        return BlockwiseSublayerWalk(inp, kept)
    return SublayerWalk(inp.adapter, inp.calibration, inp.batch_size, kept, inp.progress)


def sublayer_ppl(inp: CriterionInputs) -> CriterionResult:
    """One-shot: ΔNLL (per parameter by default) of removing each present sublayer alone; lowest removed first.

    Scores are the values themselves (higher = costlier to remove = more important); the dense calibration NLL and
    each sublayer's raw ΔNLL are saved beside them."""
    assert inp.calibration is not None, "sublayer_ppl needs calibration data"
    cfg = inp.settings if isinstance(inp.settings, SublayerPPLSettings) else SublayerPPLSettings()
    adapter, params = inp.adapter, _params(inp.adapter)
    walk = _walk(inp)
    try:  # every candidate in one call: one pass over the layers for the sequential walk
        found, _ = walk.deltas(list(range(len(walk.kept))), len(walk.ids), desc="sublayer removal NLL")
        deltas = dict(zip(walk.kept, found, strict=True))
        nll = walk.nll()
    finally:
        walk.close()
    values = {u: _value(d, params[u], cfg.objective) for u, d in deltas.items()}
    n = adapter.num_blocks
    attention = [values.get(("attention", i), -math.inf) for i in range(n)]
    mlp = [values.get(("mlp", i), -math.inf) for i in range(n)]
    # removed sublayers (no-ops already) score -1e30: present-only filtering in selection keeps them out anyway
    attention, mlp = ([v if math.isfinite(v) else -1e30 for v in xs] for xs in (attention, mlp))
    return CriterionResult(
        scores=[a + m for a, m in zip(attention, mlp, strict=True)],
        extra={"attention": attention, "mlp": mlp, "objective": cfg.objective, "calibration_nll": nll,
               "delta_nll": {f"{k}.{i}": d for (k, i), d in deltas.items()}},
    )


def _target(inp: CriterionInputs, adapter: Any) -> tuple[tuple[str, ...], int | None, int | None]:
    """(allowed kinds, count, parameter budget) from the later ``units: sublayers`` prune stage."""
    prune = inp.prune
    if prune is None or getattr(prune, "units", None) != "sublayers":
        raise ValueError("sublayer_sleb removes sublayers until the later prune stage's target: add a prune stage with "
                         "units: sublayers (and num_sublayers or ratio) after this score stage")
    kinds = ("attention", "mlp") if prune.sublayers == "both" else (prune.sublayers,)
    budget = ratio_to_params(prune.ratio, adapter.total_params()) if prune.ratio is not None else None
    return kinds, prune.num_sublayers, budget


def sublayer_sleb(inp: CriterionInputs) -> CriterionResult:
    """SLEB's iterative greedy (arXiv 2402.09025, Alg. 1) over attention / MLP sublayers, lazy and screened:

        repeat: u* = argmin_{u ∈ kept, allowed} ΔNLL(model ∖ removed ∖ u) [/ params(u)];  removed ← removed ∪ {u*}
        until |removed| = num_sublayers or params(removed) ≥ ratio · params(model)
    """
    assert inp.calibration is not None, "sublayer_sleb needs calibration data"
    cfg = inp.settings if isinstance(inp.settings, SublayerSLEBSettings) else SublayerSLEBSettings()
    adapter, params = inp.adapter, _params(inp.adapter)
    kinds, count, budget = _target(inp, adapter)
    walk = _walk(inp)
    try:
        return _greedy(walk, adapter, cfg, params, kinds, count, budget, inp.progress)
    finally:
        walk.close()


def _greedy(walk: Any, adapter: Any, cfg: SublayerSLEBSettings, params: dict[Unit, int], kinds: tuple[str, ...], count: int | None,
            budget: int | None, progress: bool) -> CriterionResult:
    """The rounds, asked of either walk in the same order (so ``sequential`` takes ``full``'s decisions): screening
    every new candidate in one call, the ``min_fresh`` best estimates in one call, then each lazy challenger alone."""
    n_all = len(walk.ids)
    n_screen = max(1, math.ceil(cfg.screen * n_all))
    estimates: dict[Unit, float] = {}  # last value per sublayer (screened or full, possibly stale)
    order: list[Unit] = []
    rounds: list[dict[str, Any]] = []
    removed_params = 0
    dense_nll: float | None = None  # read after the first pass (the sequential walk computes the states in it)

    def done() -> bool:
        return len(order) >= count if count is not None else removed_params >= (budget or 0)

    bar = tqdm(desc="sublayer SLEB rounds", disable=not progress)
    while not done():
        t0 = time.perf_counter()
        cands = _candidates(walk.kept, kinds)
        if not cands:
            raise ValueError(f"sublayer_sleb: no {' / '.join(kinds)} sublayer left to remove after {len(order)} "
                             "(one of each kind stays); lower the target")
        unit_at = {walk.kept[q]: q for q in cands}
        new = [u for u in unit_at if u not in estimates]
        screened = 0
        if new and cfg.screen < 1.0:
            found, _ = walk.deltas([unit_at[u] for u in new], n_screen)
            for u, delta in zip(new, found, strict=True):
                estimates[u] = _value(delta, params[u], cfg.objective)
            screened = len(new)
        fresh: dict[Unit, float] = {}
        held: list[tuple[Unit, Any]] = []  # the best fresh candidate's states after its removal (no second pass)

        def rescore(us: list[Unit]) -> None:
            found, tails = walk.deltas([unit_at[u] for u in us], n_all, keep=True)
            for u, delta in zip(us, found, strict=True):
                fresh[u] = estimates[u] = _value(delta, params[u], cfg.objective)
                tail = tails.get(unit_at[u])
                if not held or fresh[u] < fresh[held[0][0]]:
                    if held:
                        walk.drop(held.pop()[1])
                    held.append((u, tail))
                else:
                    walk.drop(tail)

        if not cfg.lazy:
            rescore(list(unit_at))
        else:
            by_estimate = sorted(unit_at, key=lambda u: (estimates.get(u, -math.inf), u[0] != "attention", u[1]))
            rescore(by_estimate[: cfg.min_fresh])
            while True:  # Minoux: take the best fresh value once no stale estimate is lower
                best = min(fresh, key=lambda u: (fresh[u], u[0] != "attention", u[1]))
                stale = [u for u in unit_at if u not in fresh]
                challenger = min(stale, key=lambda u: (estimates.get(u, -math.inf), u[0] != "attention", u[1]),
                                 default=None)
                if challenger is None or fresh[best] <= estimates.get(challenger, -math.inf):
                    break
                rescore([challenger])
        best = min(fresh, key=lambda u: (fresh[u], u[0] != "attention", u[1]))
        if dense_nll is None:
            dense_nll = walk.nll()
        (holder, tail), = held
        if holder != best:
            walk.drop(tail)
        walk.remove(unit_at[best], tail if holder == best else None)
        order.append(best)
        removed_params += params[best]
        estimates.pop(best)
        nll = walk.nll()
        rounds.append({"removed": f"{best[0]}.{best[1]}", "value": fresh[best], "fresh": len(fresh), "screened": screened,
                       "candidates": len(unit_at), "calibration_nll": nll, "removed_params": removed_params,
                       "seconds": round(time.perf_counter() - t0, 3)})
        bar.update(1)
        log.info("sublayer_sleb round %d: removed %s.%d (%.3g), calibration NLL %.4f, %d/%d params, %d fresh + %d "
                 "screened, %.0fs", len(order), *best, fresh[best], nll, removed_params, budget or 0, len(fresh),
                 screened, rounds[-1]["seconds"])
        bar.set_postfix(removed=f"{best[0]}.{best[1]}", nll=f"{nll:.3f}")
    bar.close()
    nll = walk.nll()
    return _result(adapter, order, estimates, {
        "sublayer_order": [f"{k}.{i}" for k, i in order], "rounds": rounds, "objective": cfg.objective,
        "dense_calibration_nll": nll if dense_nll is None else dense_nll, "calibration_nll": nll,
        "removed_params": removed_params})
