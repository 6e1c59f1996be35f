"""Integrators of the joint state (x: latents + semantics, cls) from t = TIME_NOISE to t = TIME_DATA.

Kept apart from the model, as SiT keeps its integrators: a sampler sees only a velocity function
``velocity(x, cls, t, y) -> (v, cls_v)``. All states are float64; the model runs in its own dtype.

- SDE (the reference sampler, method.md section 6): Euler-Maruyama with diffusion w(t) = 2t on the grid
  linspace(1, 0.04, steps) followed by 0; the score follows from the velocity of the linear path,
  s = (-(1 - t) v - x) / t; drift d = v - w/2 s; x <- x + d dt + sqrt(w |dt|) xi; the last step is
  deterministic (no noise).
- ODE: Euler (x <- x + v dt) or Heun (trapezoid with an Euler predictor) on the same grid.

Classifier-free guidance acts on velocities: since the drift is affine in v with the same x for both
halves, guiding the velocity and guiding the drift are the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from reglue.constants import CFG_CHANNEL_SETS, LATENT_CHANNELS, NULL_CLASS, TIME_DATA, TIME_NOISE

SAMPLERS = ("sde", "ode-euler", "ode-heun")
SDE_LAST_TIME = 0.04  # the reference's grid ends at 0.04, then one deterministic step to 0


def time_grid(steps: int) -> torch.Tensor:
    """linspace(1, 0.04, steps) then 0: ``steps`` intervals, float64 (the reference's grid, used by every sampler)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    body = torch.linspace(TIME_NOISE, SDE_LAST_TIME, steps, dtype=torch.float64) if steps > 1 else \
        torch.tensor([TIME_NOISE], dtype=torch.float64)
    return torch.cat([body, torch.tensor([TIME_DATA], dtype=torch.float64)])


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """Score of the linear path: (-(1 - t) v - x) / t."""
    return (-(1.0 - t) * v - x) / t


def diffusion_coefficient(t: float) -> float:
    """w(t) = 2t, the reference's SDE diffusion."""
    return 2.0 * t


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: scales, the channels they touch, and the time interval where they act."""

    scale: float = 1.0
    cls_scale: float | None = None  # None: the same as ``scale``
    interval: tuple[float, float] = (0.0, 1.0)
    channels: str = "all"  # "all" (REGLUE's choice) or "latents" (the VAE channels only)
    latent_channels: int = LATENT_CHANNELS
    reference_vae_cfg: bool = False  # reproduce the reference's --vae_cfg: d_c + s (d_c - d_u) on the latents

    def __post_init__(self):
        low, high = self.interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance interval {low},{high} must satisfy 0 <= LOW <= HIGH <= 1")
        if self.channels not in CFG_CHANNEL_SETS:
            raise ValueError(f"guidance channels {self.channels!r}: choose {', '.join(CFG_CHANNEL_SETS)}")

    @property
    def effective_cls_scale(self) -> float:
        """The [CLS] scale in force."""
        return self.scale if self.cls_scale is None else self.cls_scale

    def active(self, t: float) -> bool:
        """True when an unconditional pass is needed at time t (a scale differs from 1 and t is in the interval)."""
        low, high = self.interval
        return (self.scale != 1.0 or self.effective_cls_scale != 1.0) and low <= t <= high

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """Guided spatial velocity from the conditional and unconditional ones."""
        s = self.scale
        if self.channels == "all":
            return uncond + s * (cond - uncond)
        c = self.latent_channels
        if self.reference_vae_cfg:
            latents = cond[:, :c] + s * (cond[:, :c] - uncond[:, :c])
        else:
            latents = uncond[:, :c] + s * (cond[:, :c] - uncond[:, :c])
        return torch.cat([latents, cond[:, c:]], dim=1)

    def combine_cls(self, cond: torch.Tensor | None, uncond: torch.Tensor | None) -> torch.Tensor | None:
        """Guided [CLS] velocity."""
        if cond is None:
            return None
        return uncond + self.effective_cls_scale * (cond - uncond)


VelocityFn = Callable[[torch.Tensor, torch.Tensor | None, float, torch.Tensor], tuple]


def evaluate_in_chunks(model, x, t: float, y, cls, chunk: int | None):
    """Model velocities for a batch, computed ``chunk`` rows at a time with the last chunk padded.

    Matrix kernels pick their algorithm by the number of rows, so a row's result can change in the last bit
    with the batch it is computed in. Evaluating every row in calls of exactly ``chunk`` rows makes each
    sample's result independent of the batch size and of the number of processes.
    """
    dtype = next(model.parameters()).dtype
    n = x.shape[0]
    size = chunk or n
    pad = (-n) % size
    if pad:
        x, y = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]), torch.cat([y, y[-1:].expand(pad)])
        cls = None if cls is None else torch.cat([cls, cls[-1:].expand(pad, *cls.shape[1:])])
    vs, cls_vs = [], []
    for start in range(0, x.shape[0], size):
        part = slice(start, start + size)
        time = torch.full((size,), t, device=x.device, dtype=dtype)
        out = model(x[part].to(dtype), time, y[part], cls=None if cls is None else cls[part].to(dtype),
                    return_projections=False)
        vs.append(out.velocity.double())
        cls_vs.append(None if out.cls_velocity is None else out.cls_velocity.double())
    v = torch.cat(vs)[:n]
    return v, (None if cls_vs[0] is None else torch.cat(cls_vs)[:n])


def guided_velocity(model, guidance: Guidance, chunk: int | None = None) -> VelocityFn:
    """A velocity function over ``model``: one conditional pass, or a doubled batch with the null label inside the
    guidance interval (the same noisy x and cls go to both halves). ``chunk``: see evaluate_in_chunks."""

    def velocity(x, cls, t, y):
        guided = guidance.active(t)
        if guided:
            x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, NULL_CLASS)])
            cls = None if cls is None else torch.cat([cls, cls])
        v, cls_v = evaluate_in_chunks(model, x, t, y, cls, chunk)
        if not guided:
            return v, cls_v
        v_c, v_u = v.chunk(2)
        cls_c, cls_u = (None, None) if cls_v is None else cls_v.chunk(2)
        return guidance.combine(v_c, v_u), guidance.combine_cls(cls_c, cls_u)

    return velocity


def _add(state, delta, dt):
    return None if state is None else state + delta * dt


@torch.no_grad()
def sample_sde(velocity: VelocityFn, x, cls, y, grid: torch.Tensor, noise: Callable[[int], tuple]):
    """Euler-Maruyama on ``grid``; ``noise(i)`` gives (xi, cls_xi) for step i. Returns the final (x, cls) in float64."""
    x, cls = x.double(), None if cls is None else cls.double()
    last = len(grid) - 2
    for i in range(len(grid) - 1):
        t, dt = float(grid[i]), float(grid[i + 1] - grid[i])
        v, cls_v = velocity(x, cls, t, y)
        w = diffusion_coefficient(t)
        d = v - 0.5 * w * score_from_velocity(v, x, t)
        cls_d = None if cls is None else cls_v - 0.5 * w * score_from_velocity(cls_v, cls, t)
        x_next, cls_next = x + d * dt, _add(cls, cls_d, dt)
        if i < last:
            xi, cls_xi = noise(i)
            x_next = x_next + (w * abs(dt)) ** 0.5 * xi.to(x)
            cls_next = None if cls is None else cls_next + (w * abs(dt)) ** 0.5 * cls_xi.to(cls)
        x, cls = x_next, cls_next
    return x, cls


@torch.no_grad()
def sample_ode(velocity: VelocityFn, x, cls, y, grid: torch.Tensor, heun: bool = False):
    """Euler or Heun on ``grid``. Returns the final (x, cls) in float64."""
    x, cls = x.double(), None if cls is None else cls.double()
    for i in range(len(grid) - 1):
        t, t_next = float(grid[i]), float(grid[i + 1])
        dt = t_next - t
        v, cls_v = velocity(x, cls, t, y)
        x_next, cls_next = x + v * dt, _add(cls, cls_v, dt)
        if heun:
            v2, cls_v2 = velocity(x_next, cls_next, t_next, y)
            x_next = x + 0.5 * (v + v2) * dt
            cls_next = None if cls is None else cls + 0.5 * (cls_v + cls_v2) * dt
        x, cls = x_next, cls_next
    return x, cls


@torch.no_grad()
def euler_ode(model, x: torch.Tensor, y: torch.Tensor, cls: torch.Tensor | None = None, steps: int = 50):
    """Unguided Euler ODE from pure noise: the training-time sample grids."""
    x, cls = sample_ode(guided_velocity(model, Guidance()), x, cls, y, time_grid(steps))
    return x.float(), None if cls is None else cls.float()
