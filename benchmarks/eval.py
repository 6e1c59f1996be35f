"""Evaluation speed against torch-fidelity and SciPy, on the same images and weights.

1. Feature extraction images/s: ours (one pass for pool, spatial and logits) against torch-fidelity's
   extractor called as its calculate_metrics does.
2. The FID trace term: our symmetric eigh route against scipy.linalg.sqrtm (ADM's), 2048-d.
3. Precision/recall: time and peak memory of ours (blocked) against torch-fidelity's prc (full matrices).
Weights: --inception-weights FILE or $REGLUE_INCEPTION_WEIGHTS (random weights of the right shape are made when
neither is given: speed does not depend on the values). Run: python benchmarks/eval.py [--images 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.fid import trace_sqrt_product_eigh, trace_sqrt_product_scipy  # noqa: E402
from evaluation.inception import InceptionFeatures, random_weights_file  # noqa: E402
from evaluation.precision_recall import precision_recall  # noqa: E402


def bench_features(weights: str, n: int, batch: int, device) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, 256, 256), dtype=np.uint8))
    ours = InceptionFeatures(weights, device=device)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=weights).to(device)
    rates = {}
    for name, fn in (("torch-fidelity", lambda x: theirs(x)), ("ours", lambda x: ours(x))):
        fn(images[:batch].to(device))  # warm-up
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, batch):
                fn(images[i : i + batch].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[name] = n / (time.perf_counter() - start)
    print(f"features ({n} images 256px, batch {batch}): torch-fidelity {rates['torch-fidelity']:.1f} img/s, ours "
          f"{rates['ours']:.1f} img/s (ours also yields the sFID features), "
          f"ratio {rates['ours'] / rates['torch-fidelity']:.2f}x")


def bench_trace(dim: int) -> None:
    rng = np.random.default_rng(0)
    x, y = (np.maximum(rng.standard_normal((3 * dim, dim)) @ rng.standard_normal((dim, dim)) / np.sqrt(dim), 0)
            for _ in range(2))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    start = time.perf_counter()
    a = trace_sqrt_product_scipy(s1, s2)
    t_scipy = time.perf_counter() - start
    start = time.perf_counter()
    b = trace_sqrt_product_eigh(s1, s2)
    t_eigh = time.perf_counter() - start
    print(f"FID trace term ({dim}-d): scipy sqrtm {t_scipy:.2f} s, eigh {t_eigh:.2f} s, ratio {t_scipy / t_eigh:.2f}x, "
          f"|difference| {abs(a - b):.2e}")


def _pr_child(which: str, n_ref: int, n_sam: int, dim: int, queue) -> None:
    """Runs in a fresh process: time and peak-RSS growth of one precision/recall implementation."""
    import resource

    from torch_fidelity.metric_prc import calculate_precision_recall_full

    gen = torch.Generator().manual_seed(1)

    def relu_features(n: int) -> torch.Tensor:  # built in float32 chunks, so no large temporary sets the peak
        out = torch.empty(n, dim)
        for start in range(0, n, 1000):
            out[start : start + 1000] = torch.randn(min(1000, n - start), dim, generator=gen).clamp_min_(0)
        return out

    ref, sam = relu_features(n_ref), relu_features(n_sam)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if which == "ours":
        precision_recall(ref, sam, block=5_000, precision="fp32")
    else:
        calculate_precision_recall_full(sam, ref, 3, 10000)
    elapsed = time.perf_counter() - start
    queue.put((elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024))


def bench_pr(n_ref: int, n_sam: int, dim: int = 2048, only_ours: bool = False) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = {}
    for name in (("ours",) if only_ours else ("torch-fidelity", "ours")):
        queue = ctx.Queue()
        child = ctx.Process(target=_pr_child, args=(name, n_ref, n_sam, dim, queue))
        child.start()
        results[name] = queue.get()
        child.join()
    print(f"precision/recall ({n_ref} x {n_sam}, {dim}-d): " + ", ".join(
        f"{k} {t:.2f} s, peak memory +{m / 2**20:.0f} MiB over the features" for k, (t, m) in results.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inception-weights", default=os.environ.get("REGLUE_INCEPTION_WEIGHTS"))
    parser.add_argument("--pr", default="2000,4000", help="reference,sample counts for precision/recall")
    parser.add_argument("--pr-only-ours", action="store_true",
                        help="skip torch-fidelity's full-matrix P/R (it needs >12 GB at 10k x 50k)")
    parser.add_argument("--skip-features", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.skip_features:
        bench_features(args.inception_weights or random_weights_file(), args.images, args.batch, device)
        bench_trace(2048)
    n_ref, n_sam = (int(v) for v in args.pr.split(","))
    bench_pr(n_ref, n_sam, only_ours=args.pr_only_ours)


if __name__ == "__main__":
    main()
