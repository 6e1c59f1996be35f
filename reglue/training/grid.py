"""Sample grids during training: EMA weights, a fixed seed, the Euler ODE, the VAE decoder, one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reglue.encoders.vae import decode_latents
from reglue.fileio import atomic_path
from reglue.transport.samplers import euler_ode

GRID_SEED = 0


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, columns*W, 3) image."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        canvas[r * h : (r + 1) * h, k * w : (k + 1) * w] = image
    return canvas


@torch.no_grad()
def save_sample_grid(model, vae, path: Path, count: int = 16, steps: int = 50, columns: int = 8) -> Path:
    """Sample ``count`` images from ``model`` (labels 0, 1, 2 ...) and write them as a PNG grid."""
    cfg = model.config
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(GRID_SEED)
    x = torch.randn(count, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(device)
    cls = torch.randn(count, cfg.cls_dim, generator=gen).to(device) if cfg.cls_token else None
    y = (torch.arange(count) % cfg.num_classes).to(device)
    was_training = model.training
    model.eval()
    x, _ = euler_ode(model, x, y, cls, steps=steps)
    model.train(was_training)
    images = decode_latents(vae, x[:, : cfg.latent_channels]).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(tile(images, columns)).save(tmp, format="PNG")
    return path
