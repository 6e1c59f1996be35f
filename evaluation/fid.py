"""The Frechet distance between Gaussians, with ADM's semantics, in float64.

FD = ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2). The default trace term uses the symmetric route:
tr sqrt(S1 S2) = sum sqrt(eig(R S2 R)) with R = S1^(1/2) (S1 S2 is similar to the PSD matrix R S2 R), two
symmetric eigendecompositions. ``backend="scipy"`` reproduces ADM's evaluator: scipy's ``sqrtm`` of S1 S2,
an eps * I offset when the result is not finite, and a check that its imaginary diagonal is negligible.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

FID_BACKENDS = ("eigh", "scipy")
ADM_EPS = 1e-6  # ADM's offset when sqrtm is not finite
ADM_IMAG_TOL = 1e-3  # ADM raises when the imaginary diagonal exceeds this


def trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray, device=None) -> float:
    """tr sqrt(S1 S2) through two symmetric eigendecompositions in float64 (on ``device`` when given)."""
    s1 = torch.as_tensor(sigma1, dtype=torch.float64, device=device)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64, device=device)
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root @ s2 @ root
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())


def trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """ADM's path: scipy.linalg.sqrtm(S1 S2) with the eps fallback and the imaginary check."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {ADM_EPS} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * ADM_EPS
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=ADM_IMAG_TOL):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, backend: str = "eigh", device=None) -> float:
    """FID (or sFID) between two Gaussians given as float arrays; everything is cast to float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different shapes: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    if backend == "eigh":
        trace = trace_sqrt_product_eigh(sigma1, sigma2, device)
    elif backend == "scipy":
        trace = trace_sqrt_product_scipy(sigma1, sigma2)
    else:
        raise ValueError(f"unknown FID backend {backend!r}; choose {', '.join(FID_BACKENDS)}")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace)
