"""Running float64 sums over one linear layer's input channels: the leaf every input observer fills.

Its own module so that the width observers, the expert observers and ``CalibrationStats`` all import it
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    def mean(self) -> torch.Tensor | None:
        """None when nothing was observed (a MoE layer has no dense MLP input)."""
        return None if self.total is None else self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per channel: (Σx² − N·x̄²) / (N − 1)."""
        return ((self.total_sq - self.count * self.mean**2) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def sq_norm(self) -> torch.Tensor:
        """‖X_j‖² over all calibration tokens."""
        return self.total_sq
