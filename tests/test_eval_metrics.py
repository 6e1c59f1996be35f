"""ADM metric maths against an independent NumPy/SciPy oracle (evaluation.md section 7.1)."""

import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from evaluation.fid import frechet_distance
from evaluation.inception_score import inception_score
from evaluation.precision_recall import manifold_radii, precision_recall
from evaluation.stats import RunningStats

# ------------------------------------------------------------------------------------------------ the oracle

def oracle_fid(mu1, s1, mu2, s2, eps=1e-6):
    """ADM's calculate_frechet_distance, restated: scipy sqrtm, eps fallback, imaginary check."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, s1, s2))
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(s1.dot(s2)), None
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def oracle_is(logits, split=5000):
    """improved-gan / ADM: softmax, consecutive splits, exp(mean KL), mean over splits."""
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split):
        part = preds[i : i + split]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def oracle_pr(ref, sam, k=3):
    """ADM's ManifoldEstimator with full float64 distance matrices."""
    def dists(a, b):
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0)

    r_ref = np.partition(dists(ref, ref), k, axis=1)[:, k]
    r_sam = np.partition(dists(sam, sam), k, axis=1)[:, k]
    d = dists(ref, sam)
    precision = np.mean((d <= r_ref[:, None]).any(axis=0))
    recall = np.mean((d <= r_sam[None, :]).any(axis=1))
    return precision, recall


# ------------------------------------------------------------------------------------------------------ FID

def _gaussian_stats(rng, d, n, relu=False, shift=0.0):
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    x = rng.standard_normal((n, d)) @ a + shift
    x = np.maximum(x, 0) if relu else x
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("d, n, relu", [(64, 3000, False), (64, 3000, True), (512, 4000, True)])
def test_fid_matches_adm_oracle(d, n, relu):
    rng = np.random.default_rng(d + n)
    m1, s1 = _gaussian_stats(rng, d, n, relu)
    m2, s2 = _gaussian_stats(rng, d, n, relu, shift=0.3)
    want = oracle_fid(m1, s1, m2, s2)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no removed scipy arguments
        assert frechet_distance(m1, s1, m2, s2, backend="scipy") == pytest.approx(want, rel=1e-12)


def test_fid_closed_forms():
    rng = np.random.default_rng(0)
    m, s = _gaussian_stats(rng, 32, 500)
    assert abs(frechet_distance(m, s, m, s)) < 1e-8
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    assert frechet_distance(mu1, np.eye(16), mu2, np.eye(16)) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-12)
    a, b = rng.random(16) + 0.1, rng.random(16) + 0.1
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    m2, s2 = _gaussian_stats(rng, 32, 500, shift=1.0)
    assert frechet_distance(m, s, m2, s2) == pytest.approx(frechet_distance(m2, s2, m, s), rel=1e-9)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    rotated = frechet_distance(q @ m, q @ s @ q.T, q @ m2, q @ s2 @ q.T)
    assert rotated == pytest.approx(frechet_distance(m, s, m2, s2), rel=1e-9)


def test_running_stats_equal_numpy_for_any_batch_split():
    x = np.random.default_rng(1).standard_normal((2100, 24)).astype(np.float32)
    want_mu, want_cov = x.astype(np.float64).mean(0), np.cov(x.astype(np.float64), rowvar=False)
    for batch in (64, 1000, 2100):
        stats = RunningStats(24)
        for start in range(0, len(x), batch):
            stats.update(torch.from_numpy(x[start : start + batch]))
        mu, cov = stats.mean_cov()
        np.testing.assert_allclose(mu, want_mu, rtol=0, atol=1e-12)
        np.testing.assert_allclose(cov, want_cov, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------- IS

def test_inception_score_matches_oracle_and_splits():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((12_000, 1008)) * 3
    score, splits = inception_score(logits)
    assert splits == 3 and score == pytest.approx(oracle_is(logits), rel=1e-12)


def test_inception_score_closed_forms():
    assert inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0, abs=1e-12)
    classes = 10
    onehot = np.full((1000, 1008), -1e4)
    onehot[np.arange(1000), np.arange(1000) % classes] = 0.0
    assert inception_score(onehot)[0] == pytest.approx(classes, rel=1e-9)
    # class-sorted order collapses the score of consecutive splits
    sorted_logits = onehot[np.argsort(np.arange(1000) % classes, kind="stable")]
    assert inception_score(sorted_logits, split_size=100)[0] < 0.2 * inception_score(onehot, split_size=100)[0]


# ------------------------------------------------------------------------------------------------------ P/R

def test_precision_recall_on_hand_made_points():
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    sam = torch.tensor([[0.5], [2.5], [100.0], [3.0 + 4.0]])
    # ref radii (4th smallest squared distance incl. self): 0->9, 1->4, 2->4, 3->9, 10->81
    radii = manifold_radii(ref)
    assert radii.tolist() == [9.0, 4.0, 4.0, 9.0, 81.0]
    p, r = precision_recall(ref, sam, precision="fp32")
    # samples inside a ref ball: 0.5 yes, 2.5 yes, 100 no, 7 yes (|7-10|^2 = 9 <= 81) -> 3/4
    assert p == 0.75
    o_p, o_r = oracle_pr(ref.numpy().astype(np.float64), sam.numpy().astype(np.float64))
    assert (p, r) == (o_p, o_r)


def test_ties_count_as_inside():
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    radii = manifold_radii(ref)  # 0 -> 9 (the farthest point, exactly at the radius)
    assert radii[0] == 9.0
    assert precision_recall(ref, torch.tensor([[-3.0]]), precision="fp32")[0] == 1.0  # distance^2 9 <= 9


@pytest.mark.parametrize("block", [10_000, 257, 1000])
def test_precision_recall_matches_oracle_for_any_block(block):
    rng = np.random.default_rng(3)
    ref = np.maximum(rng.standard_normal((1200, 64)), 0).astype(np.float32)
    sam = np.maximum(rng.standard_normal((1500, 64)) + 0.1, 0).astype(np.float32)
    got = precision_recall(torch.from_numpy(ref), torch.from_numpy(sam), block=block, precision="fp32")
    assert got == oracle_pr(ref, sam)  # the oracle on the same float32 features: exactly
    assert got == pytest.approx(oracle_pr(ref.astype(np.float64), sam.astype(np.float64)), abs=2e-3)
    exact = precision_recall(torch.from_numpy(ref), torch.from_numpy(sam), block=10_000, precision="fp32")
    assert got == exact  # blocking never changes the answer


def test_fp16_mode_stays_close_and_falls_back_on_overflow():
    rng = np.random.default_rng(4)
    ref = torch.from_numpy(np.maximum(rng.standard_normal((800, 64)), 0).astype(np.float32))
    sam = torch.from_numpy(np.maximum(rng.standard_normal((900, 64)), 0).astype(np.float32))
    p16, r16 = precision_recall(ref, sam, precision="fp16")
    p32, r32 = precision_recall(ref, sam, precision="fp32")
    assert abs(p16 - p32) < 0.01 and abs(r16 - r32) < 0.01
    big = ref * 100  # squared norms far beyond fp16's 65504: the fp32 fallback must give the fp32 answer
    assert precision_recall(big, sam * 100, precision="fp16") == precision_recall(big, sam * 100, precision="fp32")
