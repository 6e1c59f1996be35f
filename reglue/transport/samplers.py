"""Integrators of the joint state (x: latents + semantics, cls) from t = TIME_NOISE to t = TIME_DATA.

Kept apart from the model, as SiT keeps its integrators: a sampler sees only a velocity function
``velocity(x, cls, t, y, final=False) -> (v, cls_v)``. All states are float64; the model runs in its own dtype.

- SDE (the reference sampler, docs/sample.md): Euler-Maruyama with diffusion w(t) = 2t on the grid
  linspace(1, 0.04, steps) followed by 0; the score follows from the velocity through the interpolant path
  the model was trained with (linear: s = (-(1 - t) v - x) / t); drift d = v - w/2 s;
  x <- x + d dt + sqrt(w |dt|) xi; the last step is deterministic (no noise).
- ODE: Euler (x <- x + v dt) or Heun (trapezoid with an Euler predictor) on the same grid, or Dormand-Prince 5(4)
  with adaptive steps from t = 1 to 0 (torchdiffeq's dopri5, SiT's own ODE sampler), its tolerances settings.

Classifier-free guidance acts on velocities: since the drift is affine in v with the same x for both
halves (and the guidance weights sum to 1), guiding the velocity and guiding the drift are the same thing.
The batch a velocity function receives is evaluated in one model call: callers that promise
batch-independent results (reglue.sampling) hand it the same fixed group of samples whatever the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from reglue.constants import CFG_CHANNEL_SETS, LATENT_CHANNELS, TIME_DATA, TIME_NOISE
from reglue.transport.path import LinearPath, Path

SAMPLERS = ("sde", "ode-euler", "ode-heun", "ode-dopri5")
ADAPTIVE = ("ode-dopri5",)  # samplers whose steps the error decides: steps caps them, their NFE is counted
SDE_LAST_TIME = 0.04  # the reference's grid ends at 0.04, then one deterministic step to 0


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of SD3 and RAE, s t / (1 + (s - 1) t): 0 and 1 stay, s > 1 spends more steps near noise
    (t = 1), s < 1 near data; s = 1 is the identity."""
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"time shift must be a finite number > 0, got {shift}")
    return t if shift == 1.0 else shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """linspace(1, 0.04, steps) then 0: ``steps`` intervals, float64 (the reference's grid, used by every sampler),
    each time then shifted by ``shift`` (shift_time; 1: the reference's grid exactly)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    body = torch.linspace(TIME_NOISE, SDE_LAST_TIME, steps, dtype=torch.float64) if steps > 1 else \
        torch.tensor([TIME_NOISE], dtype=torch.float64)
    return shift_time(torch.cat([body, torch.tensor([TIME_DATA], dtype=torch.float64)]), shift)


def function_evaluations(sampler: str, grid: torch.Tensor, guidance: "Guidance") -> int | None:
    """Model evaluations per sample of ``sampler`` on ``grid``: one per velocity call, two where guidance is active
    (the conditional and the null-class rows); Heun calls the velocity twice an interval. None for an adaptive
    sampler (sample_dopri5 counts its own)."""
    if sampler in ADAPTIVE:
        return None
    def calls(t: float, final: bool = False) -> int:
        rule = guidance.final_step() if final else guidance
        return 2 if rule.active(t) else 1
    times = [float(t) for t in grid]
    last = len(times) - 2
    total = 0
    for i in range(len(times) - 1):
        total += calls(times[i], final=sampler == "sde" and i == last)
        if sampler == "ode-heun":
            total += calls(times[i + 1])
    return total


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
    # (on the loop steps only: its last, deterministic step uses the standard formula on every channel)

    def __post_init__(self):
        if not all(math.isfinite(v) for v in (self.scale, self.effective_cls_scale)):
            raise ValueError(f"guidance scales must be finite, got {self.scale}, {self.cls_scale}")
        low, high = self.interval
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"guidance interval {low},{high} must satisfy 0 <= LOW <= HIGH <= 1")
        if self.channels not in CFG_CHANNEL_SETS:
            raise ValueError(f"guidance channels {self.channels!r}: choose {', '.join(CFG_CHANNEL_SETS)}")

    @property
    def effective_cls_scale(self) -> float:
        """The [CLS] scale in force."""
        return self.scale if self.cls_scale is None else self.cls_scale

    def final_step(self) -> "Guidance":
        """The guidance of the SDE's last, deterministic step: the reference's --vae_cfg switches to standard CFG
        on every channel there (its euler_maruyama_sampler's final step has no --vae_cfg branch)."""
        if not self.reference_vae_cfg:
            return self
        return Guidance(self.scale, self.cls_scale, self.interval, "all", self.latent_channels)

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


VelocityFn = Callable[..., tuple]


def model_velocity(model, x: torch.Tensor, t: float, y: torch.Tensor, cls: torch.Tensor | None) -> tuple:
    """(v, cls_v) in float64 from one model call on the whole batch, inputs cast to the model's dtype."""
    dtype = next(model.parameters()).dtype
    time = torch.full((x.shape[0],), t, device=x.device, dtype=dtype)
    out = model(x.to(dtype), time, y, cls=None if cls is None else cls.to(dtype), return_projections=False)
    return out.velocity.double(), None if out.cls_velocity is None else out.cls_velocity.double()


def guided_velocity(model, guidance: Guidance, guide=None) -> VelocityFn:
    """A velocity function over ``model``: one conditional pass, or a doubled batch (conditional rows, then the
    same noisy x and cls with the model's null class) inside the guidance interval. ``final=True`` asks for the
    last deterministic SDE step's guidance (Guidance.final_step).

    With a ``guide`` model (autoguidance, Karras et al. 2024): inside the interval the guide's velocity on the same
    x, cls and labels takes the null-class pass's place, v_guide + w (v_model - v_guide), each model called once on
    the chunk (the model's call is the unguided one, so a guide equal to the model gives the unguided samples)."""
    if guide is not None:
        return _autoguided_velocity(model, guide, guidance)

    def velocity(x, cls, t, y, final: bool = False):
        rule = guidance.final_step() if final else guidance
        if not rule.active(t):
            return model_velocity(model, x, t, y, cls)
        x2, y2 = torch.cat([x, x]), torch.cat([y, torch.full_like(y, model.null_class)])
        v, cls_v = model_velocity(model, x2, t, y2, None if cls is None else torch.cat([cls, cls]))
        v_c, v_u = v.chunk(2)
        cls_c, cls_u = (None, None) if cls_v is None else cls_v.chunk(2)
        return rule.combine(v_c, v_u), rule.combine_cls(cls_c, cls_u)

    return velocity


def _autoguided_velocity(model, guide, guidance: Guidance) -> VelocityFn:
    """guided_velocity with a guide model in place of the null class."""

    def velocity(x, cls, t, y, final: bool = False):
        rule = guidance.final_step() if final else guidance
        v, cls_v = model_velocity(model, x, t, y, cls)
        if not rule.active(t):
            return v, cls_v
        g, cls_g = model_velocity(guide, x, t, y, cls)
        return rule.combine(v, g), rule.combine_cls(cls_v, cls_g)

    return velocity


def _add(state, delta, dt):
    return None if state is None else state + delta * dt


@torch.no_grad()
def sample_sde(velocity: VelocityFn, x, cls, y, grid: torch.Tensor, noise: Callable[[int], tuple],
               path: Path = LinearPath()):
    """Euler-Maruyama on ``grid`` for a model trained on ``path``; ``noise(i)`` gives (xi, cls_xi) for step i.

    Returns the final (x, cls) in float64."""
    x, cls = x.double(), None if cls is None else cls.double()
    last = len(grid) - 2
    for i in range(len(grid) - 1):
        t, dt = float(grid[i]), float(grid[i + 1] - grid[i])
        v, cls_v = velocity(x, cls, t, y, final=i == last)
        w = diffusion_coefficient(t)
        d = v - 0.5 * w * path.score_from_velocity(v, x, t)
        cls_d = None if cls is None else cls_v - 0.5 * w * path.score_from_velocity(cls_v, cls, t)
        x_next, cls_next = x + d * dt, _add(cls, cls_d, dt)
        if i < last:
            xi, cls_xi = noise(i)
            x_next = x_next + (w * abs(dt)) ** 0.5 * xi.to(x)
            cls_next = None if cls is None else cls_next + (w * abs(dt)) ** 0.5 * cls_xi.to(cls)
        x, cls = x_next, cls_next
    return x, cls


@torch.no_grad()
def sample_dopri5(velocity: VelocityFn, x, cls, y, rtol: float = 1e-3, atol: float = 1e-6, max_steps: int = 10_000):
    """Dormand-Prince 5(4) with adaptive steps from t = 1 (noise) to t = 0 (torchdiffeq; SiT's ODE defaults rtol
    1e-3, atol 1e-6), at most ``max_steps`` steps. Returns the final (x, cls) in float64 and the velocity calls made
    (each a model call on the whole batch, two under guidance)."""
    from torchdiffeq import odeint

    calls = [0]

    def derivative(t, state):
        calls[0] += 1
        v, cls_v = velocity(state[0], state[1] if len(state) > 1 else None, float(t), y)
        return (v,) if cls_v is None else (v, cls_v)

    start = (x.double(),) if cls is None else (x.double(), cls.double())
    times = torch.tensor([TIME_NOISE, TIME_DATA], dtype=torch.float64, device=x.device)
    out = odeint(derivative, start, times, method="dopri5", rtol=rtol, atol=atol,
                 options={"max_num_steps": max_steps})
    return out[0][-1], (None if cls is None else out[1][-1]), calls[0]


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
