"""The REPA projector: maps transformer hidden states onto the frozen vision encoder's feature space."""

import torch
import torch.nn as nn


class ReprProjector(nn.Module):
    """MLP Linear(D->H)-SiLU-Linear(H->H)-SiLU-Linear(H->out), applied to every token."""

    def __init__(self, hidden_size: int, projector_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, out_dim),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, T, out_dim)."""
        return self.mlp(tokens)
