"""The semantic compressor: a convolutional autoencoder that squeezes stacked VFM features to a few channels.

For a channel list [c0, ..., cL] the encoder is a 3x3 convolution between each consecutive pair with a
ResidualBlock after every convolution but the last; the decoder mirrors the list. REGLUE uses
[3072, 256, 16]: 3072x16x16 standardised DINOv2 features -> 16x16x16.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class ConvStack(nn.Module):
    """Convolutions along a channel list, a ResidualBlock after each but the last (no output activation)."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if i < len(channels) - 2:
                layers.append(ResidualBlock(c_out))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SemanticCompressor(nn.Module):
    """Autoencoder over standardised VFM features: encode (N, c0, h, w) -> (N, cL, h, w) and back."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"compressor channel list needs at least two entries, got {list(channels)}")
        self.channels = list(channels)
        self.encoder = ConvStack(self.channels)
        self.decoder = ConvStack(self.channels[::-1])

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(N, c0, h, w) -> (N, cL, h, w)."""
        return self.encoder(features)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """(N, cL, h, w) -> (N, c0, h, w)."""
        return self.decoder(code)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, code)."""
        code = self.encode(features)
        return self.decode(code), code
