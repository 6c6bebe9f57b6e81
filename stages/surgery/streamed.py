"""The streamed prune and export (``model: {load: streaming}``, ``prunelab.stages.io.streaming`` has the whole
picture): compensation deferred at plan time (``after_plan``), then block by block — block i materialized, its dense
Grams collected on the calibration states, the plan's surgery and compensation applied with the same code as a
resident run (``lean_optimal``: optimal compensation's arithmetic with fewer temporaries), written into the
pre-allocated shards, freed. A LaCo plan's merges are replayed first, in plan order, with only each merge's sources
resident (``prunelab.stages.surgery.merge.replay_merges``); a merged block is written from its file on disk.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from prunelab.stages.arch import adapter_for, compensation_refusal
from prunelab.stages.arch.base import STAT_KEYS
from prunelab.stages.calibration.streamed import is_streamed, weights_of
from prunelab.stages.core.files import atomic_dir
from prunelab.stages.io.card import model_card
from prunelab.stages.io.streaming import DEFAULT_SHARD_MB, ShardWriter, check_structure, output_spec
from prunelab.stages.surgery.plan import DepthPlan, WidthPlan

if TYPE_CHECKING:
    import torch
    from torch import nn


# ----------------------------------------------------------------------------- prune: deferred compensation
def bias_parts(model: nn.Module, plan: Any) -> dict[str, str]:
    """part (attn | mlp) → config flag, for the parts whose output projections compensation gives a bias (as
    ``add_output_biases`` would: every layer's q/k/v/o or gate/up/down, zero where nothing was folded in)."""
    comp = getattr(getattr(plan, "target", None), "compensation", None)
    if not isinstance(plan, WidthPlan) or comp is None or comp.type == "none":
        return {}
    if comp.type == "optimal" and not comp.bias:
        return {}
    if comp.type not in ("bias", "optimal"):
        raise ValueError(f"compensation: {comp.type} is not applied by the streamed export; use none, bias or optimal")
    ad = adapter_for(model)
    wanted = {"attn": any(r.q_heads for r in plan.layers.values()), "mlp": any(r.mlp for r in plan.layers.values())}
    flags = ad.bias_flags()
    out = {}
    for part, want in wanted.items():
        if want:
            if part not in flags:
                raise ValueError(compensation_refusal(model.config.model_type) or f"{ad.family} cannot hold a {part} bias")
            out[part] = flags[part]
    return out


BIAS_ROLES = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def add_biases(layer: nn.Module, ad: Any, parts: dict[str, str], device: Any = None) -> None:
    """Zero biases on every projection of ``parts`` that has none (meta on a skeleton)."""
    import torch  # lazy: torch-free
    from torch import nn  # lazy: torch-free

    for part in parts:
        for role in BIAS_ROLES[part]:
            lin = ad.linear(layer, role)
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                    device=device or lin.weight.device))


def after_plan(model: nn.Module, plan: Any) -> None:
    """A streamed skeleton after ``apply_plan``: the biases compensation will add (meta) and their config flags, so the
    skeleton's shapes, ``total_params`` and config are those of the model the export writes. No-op when resident."""
    if not is_streamed(model):
        return
    parts = bias_parts(model, plan)
    ad = adapter_for(model)
    for layer in ad.layers:
        add_biases(layer, ad, parts)
    for flag in parts.values():
        setattr(model.config, flag, True)


def _stage_setting(ctx: Any, kind: str, pick: Any, default: Any) -> Any:
    """A setting of the last stage of ``kind`` in the recipe (the export reads the calibration and score settings)."""
    found = [s for s in ctx.recipe.stages.values() if getattr(s, "type", None) == kind]
    return pick(found[-1]) if found else default


def export_streamed(ctx: Any, cfg: Any) -> dict[str, Any]:
    """``model/`` for a streamed run, one block resident at a time; see the module docstring. Returns what the hf
    export returns (path; ``reload_max_abs_diff`` is None: a reload would hold the whole model) plus the
    structural check and the block timing."""

    from huggingface_hub import ModelCard  # lazy: startup
    from prunelab.stages.calibration.sequential import BoundaryCache, skeleton  # lazy: torch-free
    from prunelab.stages.io.models import DTYPES  # lazy: torch-free
    from prunelab.stages.surgery.merge import MergedBlocks, block_resident, replay_merges  # lazy: torch-free

    pruned, plan, weights = ctx.model, ctx.plan, weights_of(ctx.model)
    if plan is not None and not isinstance(plan, (DepthPlan, WidthPlan)):
        raise ValueError(f"streamed export applies depth and width plans; this one is {plan.kind}")
    dense = skeleton(weights.folder, next(pruned.parameters()).dtype)
    ad = adapter_for(dense)
    out_dtype = next(pruned.parameters()).dtype if cfg.dtype == "same" else DTYPES[cfg.dtype]
    removed = set(plan.removed_blocks) if isinstance(plan, DepthPlan) else set()
    widths = {int(k): v.model_dump() for k, v in plan.layers.items()} if isinstance(plan, WidthPlan) else {}
    comp = plan.target.compensation if isinstance(plan, WidthPlan) else None
    parts = bias_parts(dense, plan) if plan is not None else {}
    optimal = comp is not None and comp.type == "optimal" and bool(widths)
    shard_mb = cfg.shard_mb if getattr(cfg, "shard_mb", None) is not None else DEFAULT_SHARD_MB
    spec = output_spec(pruned, out_dtype)
    target = ctx.run_dir / "model"
    seconds: list[float] = []
    with atomic_dir(target) as tmp:
        writer = ShardWriter(tmp, spec, int(shard_mb * 2**20))
        merged = MergedBlocks(weights.device)  # LaCo's merged blocks, replayed first (their sources resident), on disk
        try:
            _copy_outer(writer, weights, spec, ad)
            if isinstance(plan, DepthPlan) and plan.merges:
                replay_merges(ad, weights, [m.model_dump(by_alias=True) for m in plan.merges], merged)
            states, prepared, folder = None, {}, None
            if optimal:  # the dense boundary states: the Grams of each block's o_proj/down_proj inputs need them

                folder = Path(tempfile.mkdtemp(prefix="prunelab-export-"))
                budget = _stage_setting(ctx, "calibrate", lambda s: s.pipeline.memory_budget_gb, 4.0) * 2**30 / 2
                size = _stage_setting(ctx, "score", lambda s: s.batch_size, 1)
                states, prepared = _embed_states(ad, weights, ctx.calibration, size, BoundaryCache(budget, folder, "e0"))
            new = 0
            for i in range(ad.num_blocks):
                if i in removed:
                    continue
                t0 = time.perf_counter()
                with block_resident(ad, weights, merged, i):
                    layer = ad.layers[i]
                    grams = None
                    if states is not None:
                        following = BoundaryCache(states.budget, states.folder, f"e{i + 1}")
                        grams = _run_dense(ad, i, layer, states, following, prepared, collect=i in widths)
                        states.clear()
                        states = following
                    if i in widths:
                        _prune_block(dense, ad, i, widths[i], comp, grams, ctx.activation_stats)
                    add_biases(layer, ad, parts)
                    for name, tensor in layer.state_dict().items():
                        writer.write(f"{ad.block_prefix(new)}.{name}", tensor)
                    del grams
                new += 1
                seconds.append(time.perf_counter() - t0)
            if states is not None:
                states.clear()
            if folder is not None:

                shutil.rmtree(folder, ignore_errors=True)
            written = writer.close()
        except BaseException:
            for f in writer.handles:
                f.close()
            raise
        finally:
            merged.close()
        config = pruned.config
        config.dtype = out_dtype
        config.save_pretrained(tmp)
        generation = weights.folder / "generation_config.json"
        if generation.is_file():
            (tmp / "generation_config.json").write_text(generation.read_text())
        ctx.tokenizer.save_pretrained(tmp)
        ModelCard(model_card(ctx)).save(tmp / "README.md")
        check = check_structure(tmp) if cfg.verify else None
    return {"path": str(target), "reload_max_abs_diff": None, "streamed": {
        **written, "structure_check": check, "blocks": len(seconds),
        "seconds_per_block": round(sum(seconds) / max(len(seconds), 1), 3)}}


def _copy_outer(writer: ShardWriter, weights: Any, spec: dict[str, Any], ad: Any) -> None:
    """Embedding, final norm and head (everything outside the blocks), tensor by tensor from the source files."""
    inside = f"{ad.BLOCKS}."
    for name in spec:
        if name.startswith(inside):
            continue
        if name not in weights.where:
            raise KeyError(f"{weights.folder}: tensor {name} not found in the safetensors files")
        with safe_open(str(weights.folder / weights.where[name]), framework="pt", device="cpu") as h:
            writer.write(name, h.get_tensor(name))


def _embed_states(ad: Any, weights: Any, calibration: torch.Tensor, batch_size: int, cache: Any) -> tuple[Any, dict]:
    """x_0 of every calibration batch (in the boundary cache) and the block inputs (masks, rotary) per shape."""
    import torch  # lazy: torch-free
    from prunelab.stages.calibration.blocks import batches  # lazy: torch-free

    prepared: dict[tuple[int, ...], Any] = {}
    with torch.no_grad(), weights.embedding(ad):
        for b, ids in enumerate(batches(calibration, batch_size)):
            x = ad.embed(ids)
            key = tuple(x.shape[:2])
            if key not in prepared:
                prepared[key] = ad.prepare(x)
            cache.put(b, x)
    cache.count = b + 1
    return cache, prepared


class GramSums:
    """The augmented Gram matrix [[Σ x xᵀ, Σ x], [Σ xᵀ, N]] of one linear's inputs in float64 (what
    ``compensation.augmented_gram`` builds from ``ChannelStats``' sums), accumulated in place in its final
    (d+1)×(d+1) buffer: no d×d temporary per batch and no copy when compensating (5632² float64 is 254 MB)."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        import torch  # lazy: torch-free

        x = x.detach().reshape(-1, x.shape[-1]).double()
        d = x.shape[1]
        if self.h is None:
            self.h = torch.zeros(d + 1, d + 1, dtype=torch.float64)
            self.total = torch.zeros(d, dtype=torch.float64)
        self.h[:d, :d].addmm_(x.T, x)
        self.total.add_(x.sum(0))
        self.count += x.shape[0]

    def augmented(self) -> torch.Tensor:
        """The finished buffer, handed over (this object no longer holds it)."""
        h, d = self.h, self.h.shape[0] - 1
        h[:d, d] = self.total
        h[d, :d] = self.total
        h[d, d] = float(self.count)
        self.h = None
        return h


def _run_dense(ad: Any, i: int, layer: nn.Module, states: Any, following: Any, prepared: dict,
               collect: bool) -> dict[str, dict[int, GramSums]] | None:
    """The dense block i on every batch's input state (outputs into ``following``); with ``collect``, the float64
    Gram, sum and count of its o_proj / down_proj inputs (the sums the score pass keeps for a resident run)."""
    import torch  # lazy: torch-free

    from prunelab.stages.calibration.blocks import run_over_batches  # lazy: torch-free

    sums = {role: GramSums() for role in ("o", "down")} if collect else {}
    handles = [ad.linear(layer, role).register_forward_pre_hook(lambda _m, args, s=s: s.add(args[0]))
               for role, s in sums.items()]
    try:
        with torch.no_grad():  # not inference mode: the Gram buffers are updated in place afterwards
            run_over_batches(ad, i, states, following, states.count, lambda x: prepared[tuple(x.shape[:2])])
    finally:
        for h in handles:
            h.remove()
    following.count = states.count
    return {STAT_KEYS[r]: {i: s} for r, s in sums.items()} if collect else None


def lean_optimal(weight: torch.Tensor, bias: torch.Tensor | None, sums: GramSums, removed: list[int],
                 damping: float, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``compensation.optimal_layer`` (the OBS update δW = −W_S (H⁻¹_SS)⁻¹ H⁻¹_S:) with one d×d matrix resident
    besides the Gram itself: the damping added to the diagonal in place, H factored by Cholesky into its own buffer
    (H + λI is positive definite), and only the rows S of H⁻¹ formed (``cholesky_solve`` against the unit vectors of
    S) instead of the whole inverse. The same solution in float64 (a test checks it against ``optimal_layer``)."""
    import torch  # lazy: torch-free

    keep = [j for j in range(weight.shape[1]) if j not in set(removed)]
    h = sums.augmented()
    if not with_bias:
        h = h[:-1, :-1].contiguous()
    s = torch.tensor(removed, dtype=torch.long)
    lam = damping * torch.diagonal(h).mean().clamp_min(1e-12)
    torch.diagonal(h).add_(lam)
    torch.linalg.cholesky(h, out=h)
    unit = torch.zeros(h.shape[0], len(removed), dtype=torch.float64)
    unit[s, torch.arange(len(removed))] = 1.0
    rows = torch.cholesky_solve(unit, h).T  # (H⁻¹)[S, :], H⁻¹ symmetric
    del h, unit
    coef = torch.linalg.solve(rows[:, s], rows)  # (H⁻¹_SS)⁻¹ H⁻¹_S:
    del rows
    if with_bias:
        b0 = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
        w = torch.cat([weight.double(), b0[:, None]], dim=1)
    else:
        w = weight.double()
    out = w - w[:, s] @ coef
    out[:, s] = 0.0
    return (out[:, keep], out[:, -1]) if with_bias else (out[:, keep], None)


def optimal_side(dense: nn.Module, i: int, removed: dict[str, list[int]], grams: dict[str, dict[int, GramSums]],
                 damping: float, with_bias: bool) -> dict[str, torch.Tensor]:
    """``compensation.optimal_compensation`` for block i, through ``lean_optimal``: the side tensors by parameter."""
    from prunelab.stages.surgery.compensation import removed_inputs  # lazy: torch-free

    side = {}
    for _, name, key, lin, idx in removed_inputs(dense, {i: removed}):
        w, b = lean_optimal(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), grams[key][i], idx,
                            damping, with_bias)
        side[f"{name}weight"] = w.to(lin.weight.dtype)
        if b is not None:
            old = b.new_zeros(b.shape) if lin.bias is None else lin.bias.detach().double()
            side[f"{name}bias"] = (b - old).to(lin.weight.dtype)
    return side


def _prune_block(dense: nn.Module, ad: Any, i: int, removed: dict[str, list[int]], comp: Any,
                 grams: dict[str, Any] | None, means: dict[str, Any] | None) -> None:
    """Block i (resident in the dense skeleton) pruned as ``apply_width`` prunes it: compensation computed on the
    dense weights (the same functions), the units sliced, the compensated weights and bias changes put in."""
    import torch  # lazy: torch-free
    from prunelab.stages.surgery.apply import prune_layer_width  # lazy: torch-free
    from prunelab.stages.surgery.compensation import bias_compensation  # lazy: torch-free

    side: dict[str, torch.Tensor] = {}
    if comp is not None and comp.type == "optimal":
        side = optimal_side(dense, i, removed, grams, comp.damping, comp.bias)
    elif comp is not None and comp.type == "bias":
        if means is None:
            raise ValueError("compensation: bias needs activation means from a width `score` stage")
        side = bias_compensation(dense, {i: removed}, means)
    layer = ad.layers[i]
    prune_layer_width(layer, removed, type(ad))
    prefix = f"{ad.block_prefix(i)}."
    params = dict(layer.named_parameters())
    for key, value in side.items():
        if key.endswith(".weight"):
            params[key.removeprefix(prefix)].data.copy_(value)
    for key, value in side.items():
        if key.endswith(".bias"):
            lin = layer.get_submodule(key.removeprefix(prefix).rsplit(".", 1)[0])
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
            lin.bias.data += value.to(lin.bias.dtype)
