"""Width units and the statistics width criteria need, from ONE calibration pass.

Units of a Llama-layout layer (``head_dim`` never changes):
- KV group g: K head g, V head g, the ``n_q / n_kv`` query heads that share them, and those heads'
  ``o_proj`` input columns;
- query head h (inside its group): its ``q_proj`` rows and ``o_proj`` columns — removed uniformly
  across groups so ``num_attention_heads`` stays a multiple of ``num_key_value_heads``;
- MLP channel c: ``gate_proj`` row c, ``up_proj`` row c, ``down_proj`` column c.

Statistics (forward hooks on ``o_proj`` and ``down_proj``, whose inputs are exactly the channels
those units own): per input channel, the mean (FLAP's bias compensation), the sample variance
(FLAP's fluctuation) and the squared norm (Wanda-sp), accumulated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from stages.calibration.blocks import batches


@dataclass(frozen=True)
class LayerGeometry:
    n_q: int
    n_kv: int
    head_dim: int
    intermediate: int
    hidden: int

    @property
    def q_per_group(self) -> int:
        return self.n_q // self.n_kv

    def group_of(self, q_head: int) -> int:
        return q_head // self.q_per_group

    def params_per_kv_group(self) -> int:
        """q rows + k rows + v rows + o columns of one group (biases ignored)."""
        return self.hidden * self.head_dim * (2 * self.q_per_group + 2)

    def params_per_q_head(self) -> int:
        return 2 * self.hidden * self.head_dim

    def params_per_mlp_channel(self) -> int:
        return 3 * self.hidden


def geometry(layer: torch.nn.Module) -> LayerGeometry:
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    return LayerGeometry(
        n_q=attn.q_proj.out_features // head_dim,
        n_kv=attn.k_proj.out_features // head_dim,
        head_dim=head_dim,
        intermediate=mlp.gate_proj.out_features,
        hidden=attn.q_proj.in_features,
    )


@dataclass
class ChannelStats:
    """Running float64 sums over calibration tokens for one linear layer's input channels."""

    count: int = 0
    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None
    keep_gram: bool = False
    gram: torch.Tensor | None = None  # Σ x xᵀ (optimal compensation's H), only when keep_gram

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        s, sq = x.sum(0), (x * x).sum(0)
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        if self.keep_gram:
            g = x.T @ x
            self.gram = g if self.gram is None else self.gram + g
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per channel: (Σx² − N·x̄²) / (N − 1)."""
        return ((self.total_sq - self.count * self.mean**2) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """‖X_j‖² over all calibration tokens."""
        return self.total_sq


@dataclass
class WidthStats:
    o_proj: list[ChannelStats] = field(default_factory=list)
    down_proj: list[ChannelStats] = field(default_factory=list)
    q_proj: list[ChannelStats] = field(default_factory=list)  # input of q/k/v (for OWL's outlier ratio)
    gate_proj: list[ChannelStats] = field(default_factory=list)  # input of gate/up
    grad_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # (1/B) Σ_b ∂L_b/∂w
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # (1/B) Σ_b (∂L_b/∂w)²
    seconds: float = 0.0


WIDTH_NEEDS = frozenset({"activations", "grad", "fisher", "hessian", "hidden"})


def collect_width_stats(
    model: torch.nn.Module, calibration: torch.Tensor, needs: set[str], batch_size: int = 1, progress: bool = True
) -> WidthStats:
    """One pass: hooks record o_proj/down_proj inputs; one backward per batch when gradients are needed."""
    import time

    t0 = time.perf_counter()
    layers = model.model.layers
    gram = "hessian" in needs  # XᵀX of o_proj / down_proj inputs, for compensation: optimal
    stats = WidthStats(*([ChannelStats(keep_gram=gram and k < 2) for _ in layers] for k in range(4)))
    handles: list[Any] = []
    if needs & {"activations", "hessian"}:
        for i, layer in enumerate(layers):
            for lin, target in ((layer.self_attn.o_proj, stats.o_proj), (layer.mlp.down_proj, stats.down_proj),
                                (layer.self_attn.q_proj, stats.q_proj), (layer.mlp.gate_proj, stats.gate_proj)):
                handles.append(lin.register_forward_pre_hook(_recorder(target[i])))
    want_grad = bool(needs & {"grad", "fisher"})
    every_param = "hidden" in needs  # hidden channels also own the embeddings, norms and head
    n_batches = 0
    device = next(model.parameters()).device
    try:
        for ids in tqdm(list(batches(calibration, batch_size)), desc="width statistics", disable=not progress):
            ids = ids.to(device)
            n_batches += 1
            if not want_grad:
                with torch.inference_mode():
                    model.model(input_ids=ids, use_cache=False)
                continue
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for name, p in model.named_parameters():
                if p.grad is None or (".layers." not in name and not every_param):
                    continue
                g = p.grad.detach().float()
                stats.grad_mean[name] = stats.grad_mean.get(name, 0) + g
                if "fisher" in needs:
                    stats.fisher[name] = stats.fisher.get(name, 0) + g * g
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    for d in (stats.grad_mean, stats.fisher):
        for k in d:
            d[k] = d[k] / n_batches
    stats.seconds = time.perf_counter() - t0
    return stats


def _recorder(target: ChannelStats) -> Any:
    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        target.add(args[0])

    return hook


def summary_tensors(stats: WidthStats) -> dict[str, Any]:
    """What selection needs later (and ``--resume`` restores): input means and squared norms per layer,
    and with the "hessian" statistic the float64 Gram matrices, sums and token counts of o_proj/down_proj inputs."""
    out: dict[str, Any] = {
        "o_proj": [s.mean.float() for s in stats.o_proj],
        "down_proj": [s.mean.float() for s in stats.down_proj],
        "sq_norm": {name: [s.sq_norm.float() for s in getattr(stats, name)] for name in ("q_proj", "gate_proj", "o_proj", "down_proj")},
    }
    if stats.o_proj and stats.o_proj[0].gram is not None:
        out["gram"] = {name: [(s.gram, s.total, s.count) for s in getattr(stats, name)] for name in ("o_proj", "down_proj")}
    return out

