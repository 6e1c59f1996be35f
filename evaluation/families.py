"""Metric families beside ADM's, each reported under its own name and never mixed with the ADM columns.

- ``clean_fid``: FID with clean-fid's "clean" preprocessing (each channel resized to 299 as a float image with
  PIL's antialiased bicubic, no quantisation), then the same TF Inception weights, pool_3 features.
- ``kid``: clean-fid's kernel inception distance on those features: polynomial kernel (x.y / d + 1)^3,
  unbiased MMD^2 averaged over subsets of at most 1000 (100 subsets), seeded.

- ``fd_dinov2``: Frechet distance in DINOv2-L/14 [CLS] features (evaluation.dinov2), as EDM2 and dgm-eval.

All use the reference batch's ``arr_0`` images (statistics of 10k images, not clean-fid's own ImageNet
statistics), so they compare runs with each other, not with numbers published by clean-fid.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from evaluation.inception import InceptionFeatures, no_tf32

FAMILIES = ("clean_fid", "kid", "fd_dinov2")
CLEAN_SIZE = 299


def clean_resize(images: np.ndarray, size: int = CLEAN_SIZE) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, size, size): PIL bicubic per channel in float ('F') mode, clipped to
    0..255."""
    out = np.empty((images.shape[0], 3, size, size), np.float32)
    for i, image in enumerate(images):
        for c in range(3):
            channel = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
            out[i, c] = np.asarray(channel.resize((size, size), resample=Image.Resampling.BICUBIC))
    return np.clip(out, 0, 255)


@torch.inference_mode()
def pool_from_float(extractor: InceptionFeatures, x: torch.Tensor) -> torch.Tensor:
    """pool_3 features of float images (B, 3, 299, 299) in 0..255, skipping torch-fidelity's uint8 resize step."""
    net = extractor.net
    x = (x.to(next(net.parameters()).device, torch.float32) - 128) / 128
    with no_tf32():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"):
            x = getattr(net, name)(x)
    return torch.flatten(x, 1).float()


def clean_batch(batch: np.ndarray, extractor: InceptionFeatures) -> np.ndarray:
    """Clean-resized pool features (b, 2048) of uint8 images (b, H, W, 3)."""
    return pool_from_float(extractor, torch.from_numpy(clean_resize(batch))).cpu().numpy()


def clean_features(images, extractor: InceptionFeatures, batch_size: int = 32) -> np.ndarray:
    """Clean-resized pool features (N, 2048) of every image of a reader."""
    return np.concatenate([clean_batch(batch, extractor) for batch in images.batches(batch_size)])


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                              seed: int = 0) -> float:
    """KID as clean-fid computes it (polynomial kernel, unbiased MMD^2 per subset, mean), float64, seeded subsets."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    m = min(x.shape[0], y.shape[0], max_subset_size)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        a_rows = x[rng.choice(x.shape[0], m, replace=False)]
        b_rows = y[rng.choice(y.shape[0], m, replace=False)]
        k_xx = (a_rows @ a_rows.T / d + 1) ** 3
        k_yy = (b_rows @ b_rows.T / d + 1) ** 3
        k_xy = (a_rows @ b_rows.T / d + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m - 1)
        total += within - 2 * k_xy.sum() / m
    return float(total / num_subsets / m)
