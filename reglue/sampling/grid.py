"""Sample grids as one PNG: the first samples of a samples.h5 (`reglue sample --grid`), and the grids of training
(EMA weights, fixed seeds, the run's sampling settings, the VAE decoder)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from evaluation.determinism import float32_matmuls
from reglue.config.sections import SamplingConfig
from reglue.encoders.vae import decode_latents
from reglue.fileio import atomic_path
from reglue.sampling.run import SampleRequest, integrate
from reglue.sampling.seeds import sample_seed
from reglue.sampling.store import SAMPLES_H5
from reglue.transport.path import get_path

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
def save_sample_grid(model, vae, path: Path, sampling: SamplingConfig, latent_scale: float,
                     interpolant: str = "linear", count: int = 16, columns: int = 8) -> Path:
    """Sample ``count`` images (labels 0, 1, 2 ...; seeds 0..count-1) with the run's sampling settings as
    `reglue sample` would, and write them as a PNG grid."""
    cfg = model.config
    device = next(model.parameters()).device
    settings, _ = SampleRequest(n=count, seed=GRID_SEED).resolve(sampling)
    labels = torch.arange(count) % cfg.num_classes if cfg.num_classes else torch.zeros(count, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with float32_matmuls(settings.tf32):  # as `reglue sample`, not the training step's TF32
            x, _ = integrate(model, settings, [sample_seed(GRID_SEED, i) for i in range(count)], labels, device,
                             get_path(interpolant))
            images = decode_latents(vae, x[:, : cfg.latent_channels].float(), latent_scale).numpy()
    finally:
        model.train(was_training)
    with atomic_path(path) as tmp:
        Image.fromarray(tile(images, columns)).save(tmp, format="PNG")
    return path


def write_grid(out: Path, png: Path, count: int = 64, columns: int = 8) -> Path:
    """A PNG of the first ``count`` samples of ``out/samples.h5``."""
    with h5py.File(out / SAMPLES_H5, "r") as f:
        images = f["images"][: min(count, f["images"].shape[0])]
    with atomic_path(png) as tmp:
        Image.fromarray(tile(images, columns)).save(tmp, format="PNG")
    return png
