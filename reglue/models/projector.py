"""The REPA projector: maps transformer hidden states onto the frozen vision encoder's feature space.

Two kinds (``model.projector.kind``, docs/models.md "The REPA projector"): REPA's per-token MLP, and iREPA's
convolution over the patch grid (arXiv 2512.10794: one 3x3 convolution, stride 1, padding 1, with bias; no
hidden layer, no activation), whose [CLS] token, when the model has one, is the same convolution applied to a
1x1 grid: only the kernel's centre tap and the bias reach it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV_KERNEL = 3  # iREPA's kernel (paper, README and jit/main_jit.py; its ldm/train.py defaults to 1, docs/models.md)


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


class ConvProjector(nn.Module):
    """iREPA's projector: Conv2d(D -> out, 3x3, padding 1) on the g x g patch grid; a leading [CLS] token (when
    ``cls_token``) sees the same convolution on a 1x1 grid (zero padding), i.e. its centre tap and bias.

    The convolution keeps PyTorch's default initialisation, as the official code does (its SiT initialises only
    Linear layers) and as SiT.initialize_weights leaves it."""

    def __init__(self, hidden_size: int, out_dim: int, grid: int, cls_token: bool):
        super().__init__()
        self.grid, self.cls_token = grid, cls_token
        self.conv = nn.Conv2d(hidden_size, out_dim, kernel_size=CONV_KERNEL, padding=CONV_KERNEL // 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, D) with T = [1 +] g*g, patches row-major -> (N, T, out_dim), [CLS] first when the model has one."""
        n, t, d = tokens.shape
        first = int(self.cls_token)
        if t - first != self.grid * self.grid:
            raise ValueError(f"the conv projector expects {first} + {self.grid}x{self.grid} tokens, got {t}")
        grid = tokens[:, first:].transpose(1, 2).reshape(n, d, self.grid, self.grid)  # (N, D, g, g)
        patches = self.conv(grid).flatten(2).transpose(1, 2)  # (N, g*g, out)
        if not first:
            return patches
        centre = self.conv.weight[:, :, CONV_KERNEL // 2, CONV_KERNEL // 2]  # (out, D)
        cls = F.linear(tokens[:, :1], centre, self.conv.bias)  # (N, 1, out)
        return torch.cat([cls, patches], dim=1)


def build_projector(config) -> nn.Module | None:
    """The REPA projector a ModelConfig asks for (``projector.kind``), or None without one."""
    p = config.projector
    if p is None:
        return None
    if p.kind == "conv":
        return ConvProjector(config.hidden_size, p.out_dim, config.input_size // config.patch_size, config.cls_token)
    return ReprProjector(config.hidden_size, p.hidden_dim, p.out_dim)
