"""Alignment metrics (evaluation/alignment.py) against independent float64 NumPy statements written here.

Tolerances: 1e-9 absolute against the NumPy references (both sides float64, sums of at most a few thousand terms
of order 1-100), 1e-12 for identities that hold exactly up to rounding (self-similarity, chunking, input types).
"""

import numpy as np
import pytest
import torch

from evaluation import alignment
from evaluation.alignment import cka, cknna, knn_accuracy, mutual_knn

TOL = 1e-9
EXACT = 1e-12


# ------------------------------------------------------------------------------------------------ NumPy references

def np_cka(x, y):
    """Linear CKA as HSIC with an explicit centring matrix: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    return np.trace(k @ h @ l_ @ h) / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(l_ @ h @ l_ @ h))


def np_hsic_unbiased(k, l_):
    """Song et al. 2012 eq. 5, written with dense matrices; the diagonals are zeroed first."""
    n = k.shape[0]
    k, l_ = k.copy(), l_.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l_, 0.0)
    ones = np.ones(n)
    value = np.trace(k @ l_) + (ones @ k @ ones) * (ones @ l_ @ ones) / ((n - 1) * (n - 2))
    value -= 2.0 * (ones @ k @ l_ @ ones) / (n - 2)
    return value / (n * (n - 3))


def np_unit_rows(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_neighbour_sets(k, topk):
    """Per row: the topk largest off-diagonal entries, ties to the smaller index (stable sort), as a loop."""
    sets = []
    for i in range(k.shape[0]):
        candidates = [j for j in range(k.shape[0]) if j != i]
        ordered = sorted(candidates, key=lambda j: (-k[i, j], j))
        sets.append(set(ordered[:topk]))
    return sets


def np_cknna(x, y, topk, normalize=True):
    """CKNNA, platonic-rep convention: unbiased HSIC of the kernels masked to pairs that are neighbours in both."""
    x, y = (np_unit_rows(x), np_unit_rows(y)) if normalize else (np.asarray(x, float), np.asarray(y, float))
    k, l_ = x @ x.T, y @ y.T
    n = k.shape[0]
    nk, nl = np_neighbour_sets(k, topk), np_neighbour_sets(l_, topk)
    mask_k, mask_l, mask = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            mask_k[i, j] = j in nk[i]
            mask_l[i, j] = j in nl[i]
            mask[i, j] = j in nk[i] and j in nl[i]
    kl = np_hsic_unbiased(mask * k, mask * l_)
    return kl / np.sqrt(np_hsic_unbiased(mask_k * k, mask_k * k) * np_hsic_unbiased(mask_l * l_, mask_l * l_))


def np_mutual_knn(x, y, topk, normalize=True):
    x, y = (np_unit_rows(x), np_unit_rows(y)) if normalize else (np.asarray(x, float), np.asarray(y, float))
    nx, ny = np_neighbour_sets(x @ x.T, topk), np_neighbour_sets(y @ y.T, topk)
    return np.mean([len(a & b) / topk for a, b in zip(nx, ny)])


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32))
    y = x @ rng.normal(size=(32, 48)) + 2.0 * rng.normal(size=(64, 48))  # related, not identical
    return x, y


# ------------------------------------------------------------------------------------------------ CKA

def test_cka_matches_centred_hsic_statement(pair):
    x, y = pair
    value = cka(x, y)
    assert value == pytest.approx(np_cka(x, y), abs=TOL)
    assert 0.0 <= value <= 1.0 and 0.1 < value < 0.99  # a non-trivial case
    wide_x, wide_y = x[:20], y[:20, :40] @ np.random.default_rng(1).normal(size=(40, 70))  # D > N: kernel form
    assert cka(wide_x, wide_y) == pytest.approx(np_cka(wide_x, wide_y), abs=TOL)


def test_cka_identity_and_invariances(pair):
    x, y = pair
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    base = cka(x, y)
    assert cka(x, x) == pytest.approx(1.0, abs=EXACT)
    assert cka(x @ q, y) == pytest.approx(base, abs=TOL)  # orthogonal map
    assert cka(3.7 * x, y) == pytest.approx(base, abs=TOL)  # isotropic scaling
    assert cka(x + rng.normal(size=32) * 5.0, y - 2.0) == pytest.approx(base, abs=TOL)  # translation
    assert 0.0 <= cka(x, rng.normal(size=(64, 48))) <= 1.0


def test_unbiased_cka_matches_song_estimator(pair):
    x, y = pair
    expected = np_hsic_unbiased(x @ x.T, y @ y.T) / np.sqrt(
        np_hsic_unbiased(x @ x.T, x @ x.T) * np_hsic_unbiased(y @ y.T, y @ y.T))
    assert cka(x, y, unbiased=True) == pytest.approx(expected, abs=TOL)
    assert cka(x + 4.0, y, unbiased=True) == pytest.approx(expected, abs=TOL)  # translation invariant too


# ------------------------------------------------------------------------------------------------ CKNNA

# Hand-checked case, normalize=False (raw inner products), topk = 2.
HAND_X = [[0, 1], [3, 2], [1, 3], [1, 1], [3, 3]]
HAND_Y = [[2, 3], [1, 3], [2, 1], [0, 1], [3, 0]]
# K = X X^T rows (off-diagonal): 0: [., 2, 3, 1, 3]  1: [2, ., 9, 5, 15]  2: [3, 9, ., 4, 12]  3: [1, 5, 4, ., 6]
#                                4: [3, 15, 12, 6, .]          -> knn_K = {2,4} {2,4} {1,4} {1,4} {1,2}
# L = Y Y^T rows (off-diagonal): 0: [., 11, 7, 3, 6]  1: [11, ., 5, 3, 3]  2: [7, 5, ., 1, 6]  3: [3, 3, 1, ., 0]
#                                4: [6, 3, 6, 0, .]            -> knn_L = {1,2} {0,2} {0,4} {0,1} {0,2}
# in both: (0,2) (1,2) (2,4) (3,1) (4,2). A = M*K: 3, 9, 12, 5, 12; B = M*L: 7, 5, 6, 3, 6 at those pairs.
# HSIC numerator terms, N = 5: tr(AB) = A24 B42 + A42 B24 = 72 + 72 = 144 (only (2,4) has its reverse);
# 1'A1 = 41, 1'B1 = 27; 1'AB1 = sum_l colsum(A)_l rowsum(B)_l = 5*5 + 24*6 + 12*6 = 241.
# 10 HSIC_KL = 144 + 41*27/12 - 2*241/3 = 907/12.
# Self terms, own masks: K: tr = 2(81 + 225 + 144) = 900, 1'A1 = 89, 1'AA1 = 29*24 + 24*21 + 36*27 = 2172,
# 10 HSIC_KK = 900 + 89^2/12 - 2*2172/3 = 1345/12; L: tr = 2(121 + 49 + 36) = 412, 1'B1 = 65,
# 1'BB1 = 27*18 + 14*16 + 18*13 + 6*12 = 1016, 10 HSIC_LL = 412 + 65^2/12 - 2*1016/3 = 1041/12.
HAND_CKNNA = 907 / np.sqrt(1345 * 1041)


def test_cknna_hand_checked_case():
    assert cknna(HAND_X, HAND_Y, topk=2, normalize=False) == pytest.approx(HAND_CKNNA, abs=TOL)
    assert np_cknna(HAND_X, HAND_Y, 2, normalize=False) == pytest.approx(HAND_CKNNA, abs=TOL)


@pytest.mark.parametrize("normalize", [True, False])
def test_cknna_matches_loop_statement(normalize):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 12))
    y = np.tanh(x @ rng.normal(size=(12, 20))) + 0.5 * rng.normal(size=(40, 20))
    value = cknna(x, y, topk=5, normalize=normalize)
    assert value == pytest.approx(np_cknna(x, y, 5, normalize), abs=TOL)
    assert 0.05 < abs(value) < 0.99


def test_cknna_ties_go_to_smaller_index():
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 3, size=(30, 3)).astype(float), rng.integers(0, 3, size=(30, 2)).astype(float)
    x[0], y[0] = 1.0, 1.0  # avoid a zero row
    x[x.sum(1) == 0] = 1.0
    y[y.sum(1) == 0] = 2.0
    assert cknna(x, y, topk=4, normalize=False) == pytest.approx(np_cknna(x, y, 4, normalize=False), abs=TOL)
    assert mutual_knn(x, y, topk=4, normalize=False) == pytest.approx(np_mutual_knn(x, y, 4, False), abs=EXACT)


def test_cknna_self_is_one_and_full_topk_is_unbiased_cka(pair):
    x, y = pair
    assert cknna(x, x, topk=10) == pytest.approx(1.0, abs=EXACT)
    n = x.shape[0]
    # topk = N - 1 keeps every off-diagonal pair: the reference's CKNNA becomes its unbiased CKA of the same kernels
    # (not the biased, column-centred CKA: the reference feeds the masked kernels to the unbiased estimator).
    xn, yn = np_unit_rows(x), np_unit_rows(y)
    expected = np_hsic_unbiased(xn @ xn.T, yn @ yn.T) / np.sqrt(
        np_hsic_unbiased(xn @ xn.T, xn @ xn.T) * np_hsic_unbiased(yn @ yn.T, yn @ yn.T))
    assert cknna(x, y, topk=n - 1) == pytest.approx(expected, abs=TOL)
    assert cknna(x, y, topk=n - 1) == pytest.approx(cka(xn, yn, unbiased=True), abs=TOL)
    assert cknna(x, y, topk=n - 1, normalize=False) == pytest.approx(cka(x, y, unbiased=True), abs=TOL)


# ------------------------------------------------------------------------------------------------ mutual k-NN

def test_mutual_knn_identity_and_hand_case(pair):
    x, y = pair
    assert mutual_knn(x, x, topk=10) == 1.0
    assert mutual_knn(x, 2.0 * x @ np.linalg.qr(np.random.default_rng(5).normal(size=(32, 32)))[0]) == 1.0
    # the hand case above: shared neighbours per row {2} {2} {4} {1} {2} -> 5 x 1 / (5 x 2)
    assert mutual_knn(HAND_X, HAND_Y, topk=2, normalize=False) == pytest.approx(0.5, abs=EXACT)
    assert mutual_knn(x, y, topk=7) == pytest.approx(np_mutual_knn(x, y, 7), abs=EXACT)


# ------------------------------------------------------------------------------------------------ k-NN accuracy

ANGLES = np.deg2rad([0, 10, 20, 48, 80, 95])
ON_CIRCLE = np.c_[np.cos(ANGLES), np.sin(ANGLES)]


def test_knn_accuracy_hand_checked():
    # cosine order by angle gap. k = 3: the 48-degree point's neighbours are 20 (gap 28), 80 (32), 10 (38): two
    # votes for the first group, so it alone is misclassified; every other point's majority is its own group.
    assert knn_accuracy(ON_CIRCLE, [0, 0, 0, 1, 1, 1], k=3) == pytest.approx(5 / 6, abs=EXACT)
    # k = 2: the 48-degree point gets one vote each (20 and 80); a tied vote goes to the smallest label.
    assert knn_accuracy(ON_CIRCLE, [0, 0, 0, 1, 1, 1], k=2) == pytest.approx(5 / 6, abs=EXACT)
    assert knn_accuracy(ON_CIRCLE, [7, 7, 7, 3, 3, 3], k=2) == 1.0
    assert knn_accuracy(ON_CIRCLE * 5.0, torch.tensor([7, 7, 7, 3, 3, 3]), k=2) == 1.0  # scale-free (cosine)


def test_knn_accuracy_clusters_and_shuffled_labels():
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(3), 200)
    centres = 10.0 * np.eye(16)[:3]
    feats = centres[labels] + rng.normal(size=(600, 16))
    assert knn_accuracy(feats, labels, k=20) == 1.0
    shuffled = knn_accuracy(feats, rng.permutation(labels), k=20)
    assert abs(shuffled - 1 / 3) < 0.08  # chance is 1/3; the sd of a 600-sample accuracy is about 0.02


# ------------------------------------------------------------------------------------------------ plumbing

def test_chunked_and_tensor_inputs_agree(pair, monkeypatch):
    x, y = pair
    labels = np.arange(64) % 4
    wide_y = y[:, :40] @ np.random.default_rng(7).normal(size=(40, 200))
    values = [cka(x, y), cka(x, wide_y), cka(x, y, unbiased=True), cknna(x, y, 6), mutual_knn(x, y, 6),
              knn_accuracy(x, labels, 5)]
    monkeypatch.setattr(alignment, "_CHUNK_ELEMENTS", 150)  # 2 rows per chunk
    chunked = [cka(x, y), cka(x, wide_y), cka(x, y, unbiased=True), cknna(x, y, 6), mutual_knn(x, y, 6),
               knn_accuracy(x, labels, 5)]
    assert chunked == pytest.approx(values, abs=EXACT)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    assert cknna(xt, yt, 6) == pytest.approx(cknna(xt.numpy(), yt.numpy(), 6), abs=EXACT)
    assert cka(xt, y) == pytest.approx(cka(xt.double().numpy(), y), abs=EXACT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(pair):
    x, y = pair
    xc, yc = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    assert cka(xc, yc) == pytest.approx(cka(x, y), abs=TOL)
    assert cka(xc, yc, unbiased=True) == pytest.approx(cka(x, y, unbiased=True), abs=TOL)
    assert cknna(xc, yc, 6) == pytest.approx(cknna(x, y, 6), abs=TOL)
    assert mutual_knn(xc, yc, 6) == mutual_knn(x, y, 6)
    assert knn_accuracy(xc, torch.arange(64).cuda() % 4, 5) == knn_accuracy(x, np.arange(64) % 4, 5)


@pytest.mark.parametrize("call, match", [
    (lambda x: cka(x, x[:-1]), "same number of rows"),
    (lambda x: cknna(x, x[:, :3].T, topk=2), "same number of rows"),
    (lambda x: cka(x[0], x[0]), "must be 2-D"),
    (lambda x: cka(x[:1], x[:1]), "too few samples"),
    (lambda x: cka(x[:3], x[:3], unbiased=True), "too few samples"),
    (lambda x: cknna(x[:5], x[:5], topk=5), "too few samples"),
    (lambda x: mutual_knn(x[:3], x[:3], topk=3), "too few samples"),
    (lambda x: knn_accuracy(x[:4], np.arange(4), k=4), "too few samples"),
    (lambda x: cknna(x, x, topk=1), "topk must be an integer >= 2"),
    (lambda x: mutual_knn(x, x, topk=0), "topk must be an integer >= 1"),
    (lambda x: knn_accuracy(x, np.arange(10), k=0), "k must be an integer >= 1"),
    (lambda x: cka(np.where(np.eye(10, 4) > 0, np.nan, x), x), "non-finite"),
    (lambda x: cknna(x, np.where(np.eye(10, 4) > 0, np.inf, x), topk=3), "non-finite"),
    (lambda x: knn_accuracy(np.full((10, 4), np.nan), np.arange(10)), "non-finite"),
    (lambda x: cka(np.ones((10, 4)), x), "zero variance"),
    (lambda x: cka(x, np.tile(x[:1], (10, 1)), unbiased=True), "zero variance"),
    (lambda x: cknna(x, np.outer(np.arange(1, 11), [1.0, 2.0]), topk=3), "zero variance"),  # equal once normalised
    (lambda x: cknna(np.vstack([x[:9], np.zeros(4)]), x, topk=3), "zero row"),
    (lambda x: mutual_knn(x, np.vstack([np.zeros(4), x[1:]]), topk=3), "zero row"),
    (lambda x: knn_accuracy(x, np.arange(10) / 2.0, k=3), "labels must be integers"),
    (lambda x: knn_accuracy(x, np.arange(9), k=3), "labels must have shape"),
])
def test_bad_inputs_refused(call, match):
    x = np.random.default_rng(8).normal(size=(10, 4))
    with pytest.raises(ValueError, match=match) as err:
        call(x)
    assert "\n" not in str(err.value)
