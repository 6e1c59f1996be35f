"""Streaming float64 feature statistics (mean and covariance), the inputs of FID and sFID."""

from __future__ import annotations

import numpy as np
import torch


class RunningStats:
    """Accumulates sum and sum of outer products in float64; any batch split gives the same mean and covariance."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        """Add (B, dim) features (any float dtype, any device)."""
        x = features.detach().to(torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(dim=0).cpu()
        self.outer += (x.T @ x).cpu()

    def merge(self, other: "RunningStats") -> None:
        """Add another accumulator (another process's share)."""
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) as np.mean and np.cov (unbiased, rowvar=False) would give, float64."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()
