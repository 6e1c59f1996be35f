"""Improved precision and recall (Kynkaanniemi et al. 2019) with ADM's semantics, in bounded memory.

k = 3 nearest neighbours counting the point itself (the radius is the 4th-smallest squared distance within
the set), membership by squared distance <= radius; precision: the fraction of samples inside some reference
ball; recall: the fraction of references inside some sample ball. Distances are computed block by block
(no N x N matrix): in fp16 as ADM does (falling back to fp32 for a block that overflows), or in fp32.
"""

from __future__ import annotations

import torch

PR_PRECISIONS = ("fp16", "fp32")
NEIGHBOURHOOD = 3


def squared_distances(a: torch.Tensor, b: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """max(|a|^2 - 2 a.b + |b|^2, 0) for every pair, (A, B) float32; fp16 as ADM, fp32 where fp16 overflows."""
    if precision == "fp16":
        a16, b16 = a.half(), b.half()
        d = (a16 * a16).sum(1, keepdim=True) - 2 * (a16 @ b16.T) + (b16 * b16).sum(1)[None]
        d = d.clamp_min(0)
        if torch.isfinite(d).all():
            return d.float()
    a, b = a.float(), b.float()
    return ((a * a).sum(1, keepdim=True) - 2 * (a @ b.T) + (b * b).sum(1)[None]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = NEIGHBOURHOOD, block: int = 10_000,
                   precision: str = "fp32") -> torch.Tensor:
    """Squared distance of each point to its k-th neighbour, the point itself counting as the 0th: (N,)."""
    radii = []
    for start in range(0, features.shape[0], block):
        rows = features[start : start + block]
        best = None
        for col in range(0, features.shape[0], block):
            d = squared_distances(rows, features[col : col + block], precision)
            best = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(best, min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k] if best.shape[1] > k else best[:, -1])
    return torch.cat(radii)


def coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int = 10_000,
             precision: str = "fp32") -> torch.Tensor:
    """For each point, whether it lies in some ball (centre, radius): (N,) bool."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for start in range(0, points.shape[0], block):
        rows = points[start : start + block]
        for col in range(0, centres.shape[0], block):
            d = squared_distances(rows, centres[col : col + block], precision)
            inside[start : start + block] |= (d <= radii[col : col + block][None]).any(dim=1)
    return inside


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = NEIGHBOURHOOD, block: int = 10_000,
                     precision: str = "fp16") -> tuple[float, float]:
    """(precision, recall) of sample features against reference features (rows are feature vectors)."""
    if precision not in PR_PRECISIONS:
        raise ValueError(f"precision mode {precision!r}: choose {', '.join(PR_PRECISIONS)}")
    ref_radii = manifold_radii(reference, k, block, precision)
    sample_radii = manifold_radii(samples, k, block, precision)
    prec = coverage(samples, reference, ref_radii, block, precision).double().mean()
    rec = coverage(reference, samples, sample_radii, block, precision).double().mean()
    return float(prec), float(rec)
