"""Metric families beside ADM's, each reported under its own name and never mixed with the ADM columns.

- ``clean_fid``: FID with clean-fid's "clean" preprocessing (each channel resized to 299 as a float image with
  PIL's antialiased bicubic, no quantisation), then the same TF Inception weights, pool_3 features.
- ``kid``: clean-fid's kernel inception distance on those features: polynomial kernel (x.y / d + 1)^3,
  unbiased MMD^2 averaged over subsets of at most 1000 (100 subsets), seeded.

- ``fd_dinov2``: Frechet distance in DINOv2-L/14 [CLS] features (evaluation.dinov2), as EDM2 and dgm-eval.

All use the reference batch's ``arr_0`` images (statistics of 10k images, not clean-fid's own ImageNet
statistics), so they compare runs with each other, not with numbers published by clean-fid.

The registry: ``FAMILIES`` (name -> the feature space it scores and its score function) is what ``reglue eval
--metrics`` accepts and what evaluation.evaluate computes; ``FEATURE_SPACES`` (name -> the per-batch feature function,
run in the ADM pass over the samples, and the result section its families share). A new family is one FAMILIES
entry (and one FEATURE_SPACES entry when it needs features of its own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from evaluation import dinov2
from evaluation.fid import frechet_distance
from evaluation.images import open_images
from evaluation.inception import InceptionFeatures, no_tf32
from evaluation.stats import RunningStats

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


def features_of(images, batch_function: Callable[[np.ndarray], np.ndarray], batch_size: int = 32) -> np.ndarray:
    """The features (N, D) of every image of a reader, ``batch_size`` images per call of ``batch_function``."""
    return np.concatenate([batch_function(batch) for batch in images.batches(batch_size)])


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


def frechet_of_features(ours: np.ndarray, theirs: np.ndarray, fid_backend: str) -> float:
    """The Frechet distance between the Gaussians (float64 mean and covariance) of two feature sets."""
    stats = []
    for feats in (ours, theirs):
        acc = RunningStats(feats.shape[1])
        acc.update(torch.from_numpy(feats))
        stats.append(acc.mean_cov())
    return frechet_distance(*stats[0], *stats[1], fid_backend)


def kid(ours: np.ndarray, theirs: np.ndarray, fid_backend: str) -> float:
    """KID with clean-fid's subsets (the FID backend plays no part)."""
    return kernel_inception_distance(ours, theirs)


def clean_batches(extractor: InceptionFeatures, options) -> Callable[[np.ndarray], np.ndarray]:
    """Clean-resized pool features of a uint8 batch, through the ADM pass's Inception network."""
    return lambda batch: clean_batch(batch, extractor)


def dinov2_batches(extractor: InceptionFeatures, options) -> Callable[[np.ndarray], np.ndarray]:
    """DINOv2-L/14 [CLS] features of a uint8 batch; the network is loaded now (``options.dinov2_weights``) on the
    device of the ADM pass's Inception network."""
    model = dinov2.load_dinov2(options.dinov2_weights).to(next(extractor.parameters()).device)
    return lambda batch: dinov2.dinov2_batch(batch, model)


def clean_notes(ref_path: Path) -> dict:
    """What the clean-fid section says beside its numbers."""
    return {"reference": f"arr_0 of {ref_path} (not clean-fid's own statistics)",
            "resize": "clean (PIL bicubic, float)"}


def dinov2_notes(ref_path: Path) -> dict:
    """What the DINOv2 section says beside its number."""
    return {"reference": f"arr_0 of {ref_path}", "network": "DINOv2-L/14 [CLS], 224 px bicubic (antialiased), "
            "positions resized as torch.hub's model"}


class FeatureSpace(NamedTuple):
    """Features of the samples computed in the ADM pass, then of the reference's arr_0 by the same function; the
    families that score them are reported together under ``section``."""

    section: str  # the key under the result's "families"
    batch_function: Callable  # (Inception extractor, EvalOptions) -> function of a uint8 (b, H, W, 3) batch -> (b, D)
    notes: Callable[[Path], dict]  # the reference path -> what the section says beside its numbers


class Family(NamedTuple):
    """One extra metric: the feature space it scores and its number."""

    space: str  # a FEATURE_SPACES key
    score: Callable[[np.ndarray, np.ndarray, str], float]  # (samples' (N, D), reference's (M, D), FID backend)


FEATURE_SPACES = {
    "clean": FeatureSpace("clean-fid", clean_batches, clean_notes),
    "dinov2": FeatureSpace("dinov2", dinov2_batches, dinov2_notes),
}
FAMILIES = {  # what --metrics accepts, in the order each section reports its numbers
    "clean_fid": Family("clean", frechet_of_features),
    "kid": Family("clean", kid),
    "fd_dinov2": Family("dinov2", frechet_of_features),
}


def batch_functions(names, extractor: InceptionFeatures, options) -> dict:
    """Feature space -> its per-batch function, for the spaces the families ``names`` score, in FEATURE_SPACES
    order; their networks are loaded now (a missing one fails before any sample is read)."""
    wanted = {FAMILIES[name].space for name in names}
    return {space: entry.batch_function(extractor, options) for space, entry in FEATURE_SPACES.items()
            if space in wanted}


def score_families(samples_features: dict, functions: dict, names, ref_path: Path, batch_size: int,
                   fid_backend: str) -> dict:
    """Section -> its notes and the numbers of the families ``names``: the samples' features (space -> (N, D), from
    the ADM pass) against the same ``functions``' features of the reference's arr_0."""
    out = {}
    for space, ours in samples_features.items():
        entry = FEATURE_SPACES[space]
        theirs = features_of(open_images(ref_path, role="reference"), functions[space], batch_size)
        numbers = {name: family.score(ours, theirs, fid_backend) for name, family in FAMILIES.items()
                   if family.space == space and name in names}
        out[entry.section] = {**entry.notes(ref_path), **numbers}
    return out
