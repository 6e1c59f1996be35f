"""Float64 NumPy references of PyTorch's bicubic resizes (half-pixel centres), written from the definitions."""

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def bicubic_matrix(m: int, n: int, scale: float) -> np.ndarray:
    """(n, m) weights of the plain bicubic resize (a = -0.75, edge clamp) for a given scale factor n/m."""
    weights = np.zeros((n, m))
    for i in range(n):
        src = (i + 0.5) / scale - 0.5
        base = int(np.floor(src))
        for k in range(-1, 3):
            weights[i, min(max(base + k, 0), m - 1)] += _cubic(np.array(src - (base + k)), -0.75)
    return weights


def antialiased_bicubic_matrix(m: int, n: int) -> np.ndarray:
    """(n, m) weights of the antialiased bicubic resize (PIL's filter: a = -0.5, support widened by m/n when
    shrinking, taps inside the image only, each row normalised to sum 1)."""
    ratio = m / n
    stretch = max(ratio, 1.0)
    support = 2.0 * stretch
    weights = np.zeros((n, m))
    for i in range(n):
        centre = (i + 0.5) * ratio
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), m)
        taps = np.arange(lo, hi)
        w = _cubic((taps - centre + 0.5) / stretch, -0.5)
        weights[i, lo:hi] = w / w.sum()
    return weights


def resize_grid(grid: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(m, m, D) -> (n, n, D): the separable resize by an (n, m) weight matrix on both axes."""
    return np.einsum("ia,abd,jb->ijd", weights, grid, weights, optimize=True)
