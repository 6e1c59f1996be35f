"""Integrators of the joint probability-flow ODE from t = TIME_NOISE to t = TIME_DATA.

Only the plain Euler ODE lives here for now (training-time sample grids); the reference SDE sampler, Heun and
classifier-free guidance come with `reglue sample`.
"""

from __future__ import annotations

import torch

from reglue.constants import TIME_DATA, TIME_NOISE


@torch.no_grad()
def euler_ode(model, x: torch.Tensor, y: torch.Tensor, cls: torch.Tensor | None = None, steps: int = 50):
    """Integrate dx/dt = v(x, t) with Euler steps on linspace(1, 0); returns the final (x, cls)."""
    times = torch.linspace(TIME_NOISE, TIME_DATA, steps + 1, dtype=torch.float64)
    x = x.double()
    cls = cls.double() if cls is not None else None
    dtype = next(model.parameters()).dtype
    for t_cur, t_next in zip(times[:-1], times[1:]):
        t = torch.full((x.shape[0],), float(t_cur), device=x.device, dtype=dtype)
        out = model(x.to(dtype), t, y, cls=None if cls is None else cls.to(dtype), return_projections=False)
        dt = float(t_next - t_cur)
        x = x + out.velocity.double() * dt
        if cls is not None:
            cls = cls + out.cls_velocity.double() * dt
    return x.float(), None if cls is None else cls.float()
