"""Representation-alignment metrics: linear CKA, CKNNA, mutual k-NN overlap and leave-one-out k-NN accuracy.

Conventions shared by every function
- Inputs are torch tensors (any device; the result is computed there) or NumPy arrays (computed on the CPU), of
  shape (N, D1) and (N, D2): row i of both describes sample i. Everything is computed in float64 and returned as a
  Python float. Bad input raises ValueError with a one-line message naming the problem: not 2-D, N differing, too
  few samples for topk, non-finite values, a zero row where rows are l2-normalised, a zero-variance
  representation (every row identical) where CKA/CKNNA is undefined.
- Neighbours are found on the rows of the linear kernel K = X X^T (inner products; cosine similarity when rows are
  l2-normalised): the topk largest entries of row i, the diagonal (the sample itself) always excluded. Ties are
  broken towards the smaller sample index, so results do not depend on the device or the sort routine.
- Memory: kernels are built in chunks of rows (about 2^24 entries each), never as a whole N x N matrix; only
  (N, topk) neighbour tables are kept. N = 10K is fine on a GPU or a CPU.

cka (Kornblith et al. 2019): linear kernel, features centred per column, the biased HSIC estimator:
  CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) = tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)),
  H = I - 11^T/N. No row normalisation. In [0, 1]; invariant to orthogonal maps, isotropic scaling and translation
  of either representation. unbiased=True uses instead the unbiased HSIC estimator (Song et al. 2012, eq. 5) on the
  linear kernels, which is translation invariant by itself (needs N >= 4) -- the platonic-rep `unbiased_cka`.

cknna (Huh, Cheung, Wang, Isola 2024, "The Platonic Representation Hypothesis", arXiv 2405.07987): computed as the
public reference implementation does (github.com/minyoungg/platonic-rep, metrics.py at commit dcd76ba,
AlignmentMetrics.cknna lines 180-227 and hsic_unbiased lines 230-249), restated here, not copied:
  - kernels K = X X^T, L = Y Y^T of the features as given to it (lines 190-191); the platonic pipeline l2-normalises
    every row first (measure_alignment.py compute_score, normalize=True, lines 34 and 55-57), so normalize=True
    (the default) does that here; pass normalize=False to use raw inner products;
  - neighbours on the kernel rows with the diagonal excluded (the `unbiased=True` default: the diagonal is set to
    -inf before torch.topk, lines 195-205); topk >= 2 is required (line 184);
  - mask M[i, j] = 1 when j is among the topk neighbours of i in BOTH K and L (row-wise, not symmetrised; lines
    208-212), i.e. the paper's alpha(i, j) = 1[i != j, x_j in knn(x_i), y_j in knn(y_i)];
  - the masked kernels M*K and M*L go through the unbiased HSIC estimator
      HSIC(A, B) = [tr(A B) + 1^T A 1 1^T B 1 / ((N-1)(N-2)) - 2 1^T A B 1 / (N-2)] / (N (N-3))
    (A, B with zero diagonal; line 218, lines 242-248). tr(A B) = sum_ij A_ij B_ji, so the first term only counts
    pairs that are neighbours of each other in both directions, as the reference does;
  - the normalising terms use each representation's own mask: HSIC(M_K*K, M_K*K) and HSIC(M_L*L, M_L*L)
    (lines 223-225, since M_K * M_K = M_K); CKNNA = HSIC_KL / sqrt(HSIC_KK HSIC_LL).
  Differences from the reference, all deliberate: float64 throughout; no 1e-6 added to the denominator (line 227),
  an undefined ratio raises ValueError instead; ties broken towards the smaller index (torch.topk's tie order is
  unspecified); the features are not clamped to the 95% quantile of |x| first (the pipeline's prepare_features,
  measure_alignment.py line 16, metrics.py remove_outliers lines 327-341) -- do that before calling if wanted.
  With topk = N - 1 the mask keeps every off-diagonal pair and CKNNA equals cka(unbiased=True) of the same
  (normalised) features. N >= max(topk + 1, 4). CKNNA can be negative.

REPA (Yu et al. 2024, arXiv 2410.06940) reports CKNNA between SiT hidden states and DINOv2 features with topk = 10
on ~10K ImageNet images (as the project's "Alignment lab" issue records), the features mean-pooled over patches and
the SiT run with the null class label (maintainer's answer in github.com/sihyun-yu/REPA issue 24; no
alignment-metric code is released). We found no statement of whether they l2-normalised rows first;
normalize=True reproduces the platonic-rep pipeline's default, normalize=False the bare AlignmentMetrics.cknna.

mutual_knn: the Platonic paper's main metric (metrics.py AlignmentMetrics.mutual_knn lines 55-84, neighbours from
compute_nearest_neighbors lines 272-285): mean over samples of |knn_K(i) intersect knn_L(i)| / topk, same neighbour
and normalisation conventions as cknna (the reference fills the diagonal with -1e8 rather than excluding it).

knn_accuracy: leave-one-out k-nearest-neighbour classification: rows l2-normalised, the k most cosine-similar
other samples vote with equal weight, a tied vote goes to the smallest label; accuracy = fraction of samples whose
vote equals their own label. Deterministic, no folds, no training split.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_CHUNK_ELEMENTS = 1 << 24  # entries of one chunk of kernel rows


def _tensor(name: str, value, device: torch.device | None = None) -> torch.Tensor:
    """value as a detached float64 tensor, checked 2-D, non-empty and finite."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{name} is complex; real features expected")
    t = t.detach().to(device=t.device if device is None else device, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return t


def _pair(x, y, min_n: int, why: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y as float64 tensors on x's device, checked to share N >= min_n."""
    xt = _tensor("x", x)
    yt = _tensor("y", y, device=xt.device)
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"x and y must have the same number of rows N: got {xt.shape[0]} and {yt.shape[0]}")
    if xt.shape[0] < min_n:
        raise ValueError(f"too few samples: N = {xt.shape[0]}, {why}")
    return xt, yt


def _check_variance(name: str, t: torch.Tensor, metric: str, after: str = "") -> None:
    """Refuse a representation whose rows are all identical (zero variance)."""
    if bool((t == t[:1]).all()):
        raise ValueError(f"{name} has zero variance (every row identical{after}): {metric} is undefined")


def _normalize_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit l2 norm; a zero row is refused."""
    norms = torch.linalg.vector_norm(t, dim=1)
    zero = torch.nonzero(norms == 0)
    if zero.numel():
        raise ValueError(f"{name} has a zero row (row {int(zero[0, 0])}): it cannot be l2-normalised")
    return t / norms[:, None]


def _chunks(n: int):
    """(start, stop) row ranges whose kernel rows hold about _CHUNK_ELEMENTS entries."""
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _kernel_rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of t t^T with the diagonal set to -inf (a sample is never its own neighbour)."""
    rows = t[start:stop] @ t.T
    local = torch.arange(stop - start, device=t.device)
    rows[local, local + start] = -math.inf
    return rows


def _top(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k largest entries of each row, ties to the smaller index, in increasing order: (c, k)."""
    kth = torch.topk(rows, k, dim=1).values[:, -1:]
    above = rows > kth
    equal = rows == kth
    need = k - above.sum(dim=1, keepdim=True)
    take = above | (equal & (torch.cumsum(equal.to(torch.int64), dim=1) <= need))
    return torch.nonzero(take)[:, 1].view(rows.shape[0], k)


def _neighbours(t: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of each sample's k largest inner products with the other samples."""
    return torch.cat([_top(_kernel_rows(t, a, b), k) for a, b in _chunks(t.shape[0])])


def _masked_hsic(cols: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of two N x N matrices zero outside (i, cols[i, m]) where they hold a[i, m] and b[i, m]."""
    n, k = cols.shape
    rows = torch.arange(n, device=cols.device)[:, None].expand(n, k)
    keys = (rows * n + cols).reshape(-1)  # sorted: rows ascend, cols ascend within a row
    reverse = (cols * n + rows).reshape(-1)
    pos = torch.searchsorted(keys, reverse).clamp(max=keys.numel() - 1)
    found = keys[pos] == reverse
    b_flat = b.reshape(-1)
    trace_ab = (a.reshape(-1) * torch.where(found, b_flat[pos], torch.zeros_like(b_flat))).sum()  # sum A_ij B_ji
    ones_a_b_ones = (a * b.sum(dim=1)[cols]).sum()  # 1^T A B 1 = sum_il A_il (B 1)_l
    return (trace_ab + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 * ones_a_b_ones / (n - 2)) / (n * (n - 3))


def cka(x, y, unbiased: bool = False) -> float:
    """Linear CKA of x (N, D1) and y (N, D2): column-centred, biased HSIC (unbiased=True: unbiased HSIC)."""
    min_n = 4 if unbiased else 2
    xt, yt = _pair(x, y, min_n, f"CKA needs N >= {min_n}" + (" with unbiased=True" if unbiased else ""))
    _check_variance("x", xt, "CKA")
    _check_variance("y", yt, "CKA")
    xt, yt = xt - xt.mean(dim=0), yt - yt.mean(dim=0)
    n, d1, d2 = xt.shape[0], xt.shape[1], yt.shape[1]
    if not unbiased and d1 * d2 <= n * (d1 + d2):  # the D x D form is the cheaper one
        xy = torch.linalg.matrix_norm(yt.T @ xt) ** 2
        xx, yy = torch.linalg.matrix_norm(xt.T @ xt), torch.linalg.matrix_norm(yt.T @ yt)
    else:  # kernel rows, chunk by chunk: sum_ij K_ij L_ij etc.
        sums = torch.zeros(3, dtype=torch.float64, device=xt.device)
        row_k = torch.zeros(n, dtype=torch.float64, device=xt.device)
        row_l = torch.zeros_like(row_k)
        for start, stop in _chunks(n):
            k_rows, l_rows = xt[start:stop] @ xt.T, yt[start:stop] @ yt.T
            if unbiased:
                local = torch.arange(stop - start, device=xt.device)
                k_rows[local, local + start] = 0
                l_rows[local, local + start] = 0
                row_k[start:stop], row_l[start:stop] = k_rows.sum(dim=1), l_rows.sum(dim=1)
            sums += torch.stack([(k_rows * l_rows).sum(), (k_rows * k_rows).sum(), (l_rows * l_rows).sum()])
        if unbiased:
            def hsic(trace: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
                return trace + r1.sum() * r2.sum() / ((n - 1) * (n - 2)) - 2 * (r1 * r2).sum() / (n - 2)

            xy, xx, yy = hsic(sums[0], row_k, row_l), hsic(sums[1], row_k, row_k), hsic(sums[2], row_l, row_l)
        else:
            xy, xx, yy = sums[0], sums[1].sqrt(), sums[2].sqrt()
    if unbiased:
        if not (xx > 0 and yy > 0):
            raise ValueError("unbiased HSIC of x or y with itself is not positive: CKA is undefined (N too small?)")
        return float(xy / torch.sqrt(xx * yy))
    if not (xx > 0 and yy > 0):
        raise ValueError("x or y has zero variance after centring: CKA is undefined")
    return float(xy / (xx * yy))


def cknna(x, y, topk: int = 10, normalize: bool = True) -> float:
    """CKNNA of x (N, D1) and y (N, D2): CKA restricted to mutual top-k neighbour pairs (platonic-rep convention)."""
    if int(topk) != topk or topk < 2:
        raise ValueError(f"topk must be an integer >= 2 for CKNNA, got {topk}")
    topk = int(topk)
    xt, yt = _pair(x, y, max(topk + 1, 4), f"CKNNA needs N >= topk + 1 = {topk + 1} and N >= 4")
    if normalize:
        xt, yt = _normalize_rows("x", xt), _normalize_rows("y", yt)
    after = " after l2 normalisation" if normalize else ""
    _check_variance("x", xt, "CKNNA", after)
    _check_variance("y", yt, "CKNNA", after)
    nn_k, nn_l, k_at_k, l_at_k, l_at_l = [], [], [], [], []
    for start, stop in _chunks(xt.shape[0]):
        k_rows, l_rows = _kernel_rows(xt, start, stop), _kernel_rows(yt, start, stop)
        ik, il = _top(k_rows, topk), _top(l_rows, topk)
        nn_k.append(ik)
        nn_l.append(il)
        k_at_k.append(k_rows.gather(1, ik))
        l_at_k.append(l_rows.gather(1, ik))
        l_at_l.append(l_rows.gather(1, il))
    nn_k, nn_l = torch.cat(nn_k), torch.cat(nn_l)
    k_at_k, l_at_k, l_at_l = torch.cat(k_at_k), torch.cat(l_at_k), torch.cat(l_at_l)
    both = (nn_k[:, :, None] == nn_l[:, None, :]).any(dim=2)  # j in knn_K(i) and in knn_L(i)
    zero = torch.zeros((), dtype=torch.float64, device=xt.device)
    hsic_kl = _masked_hsic(nn_k, torch.where(both, k_at_k, zero), torch.where(both, l_at_k, zero))
    hsic_kk = _masked_hsic(nn_k, k_at_k, k_at_k)
    hsic_ll = _masked_hsic(nn_l, l_at_l, l_at_l)
    if not (hsic_kk > 0 and hsic_ll > 0):
        raise ValueError("the masked self-alignment (unbiased HSIC) of x or y is not positive: CKNNA is undefined")
    return float(hsic_kl / torch.sqrt(hsic_kk * hsic_ll))


def mutual_knn(x, y, topk: int = 10, normalize: bool = True) -> float:
    """Mutual k-NN alignment of x (N, D1) and y (N, D2): mean fraction of shared top-k neighbours."""
    if int(topk) != topk or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk}")
    topk = int(topk)
    xt, yt = _pair(x, y, topk + 1, f"mutual k-NN needs N >= topk + 1 = {topk + 1}")
    if normalize:
        xt, yt = _normalize_rows("x", xt), _normalize_rows("y", yt)
    nn_x, nn_y = _neighbours(xt, topk), _neighbours(yt, topk)
    shared = (nn_x[:, :, None] == nn_y[:, None, :]).any(dim=2).sum(dim=1)
    return float(shared.to(torch.float64).mean() / topk)


def knn_accuracy(features, labels, k: int = 20) -> float:
    """Leave-one-out k-NN accuracy of features (N, D) against integer labels (N,): cosine, majority vote."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    k = int(k)
    feats = _tensor("features", features)
    lab = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if lab.ndim != 1 or lab.shape[0] != feats.shape[0]:
        raise ValueError(f"labels must have shape ({feats.shape[0]},) to match features, got {tuple(lab.shape)}")
    if lab.is_floating_point() or lab.is_complex():
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    if feats.shape[0] < k + 1:
        raise ValueError(f"too few samples: N = {feats.shape[0]}, k-NN accuracy needs N >= k + 1 = {k + 1}")
    feats = _normalize_rows("features", feats)
    classes, codes = torch.unique(lab.to(device=feats.device, dtype=torch.int64), sorted=True, return_inverse=True)
    correct = 0
    for start, stop in _chunks(feats.shape[0]):
        votes = codes[_top(_kernel_rows(feats, start, stop), k)]
        counts = torch.zeros(stop - start, classes.numel(), dtype=torch.int64, device=feats.device)
        counts.scatter_add_(1, votes, torch.ones_like(votes))
        correct += int((counts.argmax(dim=1) == codes[start:stop]).sum())  # argmax: first maximum, smallest label
    return correct / feats.shape[0]
