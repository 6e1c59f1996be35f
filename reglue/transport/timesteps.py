"""Training-time sampling of t in [0, 1] (t = 1 is noise)."""

from __future__ import annotations

import math

import torch

TIME_SAMPLERS = ("uniform", "lognormal")


def sample_time(
    n: int, kind: str = "uniform", path: str = "linear", device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n times, one per sample: uniform on [0, 1], or EDM's lognormal sigma = exp(N(0, 1)) mapped onto the path."""
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "lognormal":
        sigma = torch.randn(n, device=device, generator=generator).exp()
        if path == "linear":
            return sigma / (1 + sigma)  # sigma = t / (1 - t)
        if path == "cosine":
            return 2 / math.pi * torch.atan(sigma)  # sigma = tan(pi t / 2)
        raise ValueError(f"lognormal time sampling is defined for the linear and cosine paths, not {path!r}")
    raise ValueError(f"unknown time sampler {kind!r}; choose one of {', '.join(TIME_SAMPLERS)}")
