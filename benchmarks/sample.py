"""Sampling speed: our sampler against a reference-style loop on the same model.

The reference-style loop (as the official generate.py runs it): float64 state, the batch doubled for
guidance at every step (no interval skipping), ``randn_like`` noise. Ours: guidance only inside the
interval, per-sample noise generators, the batch as one chunk (one model call per step, as `reglue sample
--chunk BATCH` runs it). Both run the SDE with the same settings;
prints images/s and the ratio. Run: python benchmarks/sample.py [--preset sit-b2-reglue] [--steps 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reglue import presets  # noqa: E402
from reglue.models import build  # noqa: E402
from reglue.sampling.seeds import SampleNoise, sample_seed  # noqa: E402
from reglue.transport.path import LinearPath  # noqa: E402
from reglue.transport.samplers import Guidance, guided_velocity, sample_sde, time_grid  # noqa: E402

score_from_velocity = LinearPath().score_from_velocity


@torch.no_grad()
def reference_loop(model, batch: int, steps: int, scale: float, device) -> torch.Tensor:
    """Reference-style Euler-Maruyama: doubled batch on every step, float64 state, randn_like noise."""
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device, dtype=torch.float64)
    cls = torch.randn(batch, cfg.cls_dim, device=device, dtype=torch.float64) if cfg.cls_token else None
    y = torch.randint(0, 1000, (batch,), device=device)
    y2 = torch.cat([y, torch.full_like(y, 1000)])
    grid = time_grid(steps)
    for i in range(steps):
        t, dt = float(grid[i]), float(grid[i + 1] - grid[i])
        t_in = torch.full((2 * batch,), t, device=device)
        out = model(torch.cat([x, x]).float(), t_in, y2, cls=None if cls is None else torch.cat([cls, cls]).float())
        v_c, v_u = out.velocity.double().chunk(2)
        v = v_u + scale * (v_c - v_u)
        d = v - t * score_from_velocity(v, x, t)
        x = x + d * dt + ((2 * t * abs(dt)) ** 0.5 * torch.randn_like(x) if i < steps - 1 else 0)
        if cls is not None:
            c_c, c_u = out.cls_velocity.double().chunk(2)
            cv = c_u + scale * (c_c - c_u)
            cls = cls + (cv - t * score_from_velocity(cv, cls, t)) * dt
    return x


@torch.no_grad()
def ours(model, batch: int, steps: int, scale: float, device) -> torch.Tensor:
    """Our sampler with the reference's guidance interval [0, 0.9]."""
    cfg = model.config
    seeds = [sample_seed(0, i) for i in range(batch)]
    noise = SampleNoise(seeds, (cfg.in_channels, cfg.input_size, cfg.input_size),
                        cfg.cls_dim if cfg.cls_token else None, device)
    x, cls = noise.initial()
    y = torch.randint(0, 1000, (batch,), device=device)
    velocity = guided_velocity(model, Guidance(scale=scale, interval=(0.0, 0.9)))
    return sample_sde(velocity, x, cls, y, time_grid(steps), noise.step)[0]


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sit-b2-reglue")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="default: 10 on CPU, 250 on GPU")
    parser.add_argument("--cfg", type=float, default=2.3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (128 if device.type == "cuda" else 8)
    steps = args.steps or (250 if device.type == "cuda" else 10)
    torch.manual_seed(0)
    model = build(presets.load(args.preset)).to(device).eval()
    print(f"{args.preset}, batch {batch}, {steps} SDE steps, cfg {args.cfg}, device {device}")
    timed(lambda: ours(model, batch, 2, args.cfg, device))  # warm-up
    t_ref = timed(lambda: reference_loop(model, batch, steps, args.cfg, device))
    t_ours = timed(lambda: ours(model, batch, steps, args.cfg, device))
    print(f"reference-style: {batch / t_ref:8.2f} img/s")
    print(f"ours           : {batch / t_ours:8.2f} img/s")
    print(f"ratio ours/reference: {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
