"""Interpolant paths x_t = alpha(t) * x_0 + sigma(t) * eps, with t = TIME_NOISE (1) pure noise, t = 0 data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times (N,) to broadcast against a tensor (N, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass(frozen=True)
class Coefficients:
    """alpha(t), sigma(t) and their time derivatives."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    d_alpha: torch.Tensor
    d_sigma: torch.Tensor


class Path:
    """Base class: subclasses define coefficients(t)."""

    name = "base"

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        """alpha, sigma, d_alpha, d_sigma at t (any shape)."""
        raise NotImplementedError

    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for clean data x0 (N, ...), noise like x0 and times t (N,)."""
        c = self.coefficients(_expand(t, x0))
        return c.alpha * x0 + c.sigma * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target dx_t/dt = d_alpha * x0 + d_sigma * noise."""
        c = self.coefficients(_expand(t, x0))
        return c.d_alpha * x0 + c.d_sigma * noise

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
        """Score grad log p_t(x) of state x with predicted velocity v at one time t (SiT's conversion).

        With r = alpha / d_alpha: score = (r v - x) / (sigma^2 - r d_sigma sigma); for the linear path
        (-(1 - t) v - x) / t. Defined for 0 < t <= 1 (the samplers never evaluate it at t = 0).
        """
        c = self.coefficients(torch.tensor(float(t), dtype=torch.float64))
        ratio = c.alpha / c.d_alpha
        variance = c.sigma**2 - ratio * c.d_sigma * c.sigma
        return (float(ratio) * v - x) / float(variance)


class LinearPath(Path):
    """alpha = 1 - t, sigma = t: the REPA/REG/REGLUE default; v = eps - x0."""

    name = "linear"

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        return Coefficients(1 - t, t, -torch.ones_like(t), torch.ones_like(t))


class CosinePath(Path):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""

    name = "cosine"

    def coefficients(self, t: torch.Tensor) -> Coefficients:
        half_pi = math.pi / 2
        return Coefficients(
            torch.cos(half_pi * t), torch.sin(half_pi * t),
            -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t),
        )


PATHS = {cls.name: cls for cls in (LinearPath, CosinePath)}


def get_path(name: str) -> Path:
    """The path called ``name`` ('linear' or 'cosine')."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; choose one of {', '.join(PATHS)}")
    return PATHS[name]()
