"""The evaluator's one chunk loop (evaluation.extract.chunk_features), shared by extract and --make-ref: fixed,
zero-padded network calls in index order from reads of any size, and float64 statistics over fixed blocks."""

from typing import NamedTuple

import numpy as np
import pytest
import torch

import evaluation.extract
from evaluation.extract import BlockStatistics, chunk_features, chunked, statistics


class Rows(NamedTuple):
    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


class RecordingNet(torch.nn.Module):
    """Features that are the images' own first values; remembers every input shape it was called with."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        flat = x.flatten(1).float() * self.scale
        return Rows(flat[:, :4], flat[:, 4:7], flat[:, :2])


def _batches(images, sizes):
    start = 0
    for size in sizes:
        yield images[start : start + size]
        start += size


def test_chunked_recuts_any_reads_into_whole_chunks_in_order():
    images = np.arange(23 * 2 * 2 * 3, dtype=np.uint8).reshape(23, 2, 2, 3)
    for sizes in ([23], [1] * 23, [5, 0, 7, 3, 8], [4, 4, 4, 4, 4, 3]):
        got = list(chunked(_batches(images, sizes), 4))
        assert [len(c) for c in got] == [4, 4, 4, 4, 4, 3]
        assert np.array_equal(np.concatenate(got), images)


@pytest.mark.parametrize("workers", [1, 3])
def test_every_call_sees_one_padded_chunk_and_rows_come_back_in_index_order(workers):
    images = np.random.default_rng(0).integers(0, 256, (11, 2, 2, 3), dtype=np.uint8)
    net = RecordingNet()
    out = list(chunk_features(_batches(images, [2, 5, 1, 3]), net, 4, workers))
    assert net.seen == [(4, 3, 2, 2)] * 3  # 11 images: chunks of 4, 4 and 3 (padded to 4)
    assert [len(part) for part, _ in out] == [4, 4, 3]
    assert np.array_equal(np.concatenate([part for part, _ in out]), images)
    pool = torch.cat([features.pool for _, features in out]).numpy()
    assert np.array_equal(pool, images.transpose(0, 3, 1, 2).reshape(11, -1)[:, :4].astype(np.float32))


def test_block_statistics_are_the_same_bits_for_any_split_and_match_numpy(monkeypatch):
    monkeypatch.setattr(evaluation.extract, "STATS_BLOCK", 5)
    rows = np.random.default_rng(1).standard_normal((23, 6)).astype(np.float32)
    whole = statistics(rows, "cpu").mean_cov()
    for sizes in ([1] * 23, [4, 9, 0, 10], [23]):
        acc = BlockStatistics(6)
        for part in _batches(rows, sizes):
            acc.add(part)
        mu, sigma = acc.finish().mean_cov()
        assert np.array_equal(mu, whole[0]) and np.array_equal(sigma, whole[1])
    x = rows.astype(np.float64)
    np.testing.assert_allclose(whole[0], x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(whole[1], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
