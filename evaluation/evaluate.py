"""One evaluation: samples and a reference batch -> FID, sFID, IS, precision, recall, with provenance."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.collectives import main_decides, main_phase
from evaluation.determinism import deterministic_kernels, side_by_side
from evaluation.environment import environment
from evaluation.extract import FEATURE_CHUNK, POOL_DIM, extract, rank_world
from evaluation.families import batch_functions, score_families
from evaluation.fid import frechet_distance
from evaluation.fileio import abandon_h5, write_error
from evaluation.images import ImageInputError, file_sha256, open_images
from evaluation.inception import InceptionFeatures
from evaluation.inception_score import IS_SPLIT, inception_score
from evaluation.precision_recall import precision_recall
from evaluation.reference import reference_for, resolve_reference

FEATURE_CACHE_ENV = "REGLUE_FEATURE_CACHE"  # where reference features are cached (default ~/.cache/reglue/features)


@dataclass(frozen=True)
class EvalOptions:
    """How to compute: the features do not depend on ``batch_size`` or the process count (evaluation.extract);
    ``feature_chunk`` and the device decide their last bits."""

    batch_size: int = 64
    device: str | None = None
    pr_precision: str = "fp16"
    fid_backend: str = "eigh"
    pr_block: int = 5_000  # rows and columns per distance block: two 5k x 5k float32 blocks, ~0.2 GB
    features_out: str | None = None
    cache_dir: str | None = None
    progress: bool = True
    families: tuple[str, ...] = ()  # extra metric families (keys of evaluation.families.FAMILIES), reported apart
    dinov2_weights: str | None = None  # for fd_dinov2
    feature_chunk: int = FEATURE_CHUNK  # images per Inception call (padded): part of the settings, never --batch-size


def reference_features(path: Path, ref_sha: str, extractor: InceptionFeatures, options: EvalOptions,
                       sample_side: int | None = None):
    """(pool features of arr_0, stored or computed statistics); the features are cached by file and weights hash.
    ``sample_side``: the samples' image side, warned about when the reference's differs."""
    import h5py

    images = open_images(path, role="reference")
    if sample_side is not None and len(images.shape) > 1 and images.shape[1] != sample_side:
        warnings.warn(f"{sample_side} px samples scored against {path}, a reference of {images.shape[1]} px images: "
                      "both are resized to 299 px for Inception, but FID across resolutions is not the published "
                      "metric (use the reference at the samples' resolution)")
    default = Path.home() / ".cache" / "reglue" / "features"
    cache_dir = Path(options.cache_dir or os.environ.get(FEATURE_CACHE_ENV) or default)
    cache = cache_dir / f"{ref_sha[:16]}-{extractor.weights_sha256[:16]}-c{options.feature_chunk}.h5"
    stored = images.statistics()
    if main_decides(cache.exists()):  # rank 0's cache decides for every rank (nodes need not share a home)
        if rank_world()[0] != 0:
            return None, None, "cached on rank 0"  # only rank 0 scores
        with h5py.File(cache, "r") as f:
            pool = f["pool"][...]
            computed = {k: f[k][...] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    else:
        pool, _, pool_stats, spatial_stats, _ = extract(images, extractor, options.batch_size, "reference",
                                                        options.progress, chunk=options.feature_chunk)
        (mu, sigma), (mu_s, sigma_s) = pool_stats.mean_cov(), spatial_stats.mean_cov()
        computed = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
        with main_phase("reference-cache") as is_main:
            if is_main:
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".tmp{os.getpid()}")
                with h5py.File(tmp, "w") as f:
                    f["pool"] = pool
                    for k, v in computed.items():
                        f[k] = v
                tmp.replace(cache)
    stats = stored if stored and all(k in stored for k in ("mu", "sigma", "mu_s", "sigma_s")) else computed
    return pool, stats, "stored in the reference file" if stats is stored else "computed from arr_0"


def _warn_about(n: int, labels: np.ndarray | None) -> None:
    if n < POOL_DIM:
        warnings.warn(f"{n} samples is fewer than the {POOL_DIM} feature dimensions: the covariance is singular "
                      "and FID is ill-conditioned")
    if n % IS_SPLIT:
        warnings.warn(f"N = {n} is not a multiple of {IS_SPLIT}: the last Inception Score split is short")
    if labels is not None and len(labels) > 1 and (np.diff(labels) >= 0).all() and labels[0] != labels[-1]:
        warnings.warn("samples are sorted by class: the Inception Score's consecutive splits will collapse")


def evaluate(samples, ref: str | None, weights: str | None = None, options: EvalOptions = EvalOptions()) -> dict:
    """ADM's five numbers for ``samples`` (.npz, samples.h5 or folder; or an image reader made in process, with
    ``name``, ``labels`` and ``provenance()``) against reference ``ref`` (name or path; None: the registry's
    ImageNet batch at the samples' resolution, imagenet256 or imagenet512).

    Under torchrun, feature extraction is split over the processes; rank 0 returns the result, the others {}.
    """
    started = time.time()
    images = open_images(samples) if _on_disk(samples) else samples
    if len(images) < 2:
        raise ImageInputError(f"{_name(samples)}: {len(images)} image(s); the metrics need at least 2 (a covariance)")
    ref_path = resolve_reference(ref or reference_for(images.shape[1]))
    extractor = InceptionFeatures(weights, device=options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref_sha = file_sha256(ref_path)
    ref_pool, ref_stats, stats_origin = reference_features(ref_path, ref_sha, extractor, options, images.shape[1])
    partial = features_partial(options.features_out) if options.features_out else None
    try:  # --features is written beside its old copy and renamed when complete: a failed run keeps a good old one
        result = _score(images, samples, ref_path, ref_pool, ref_stats, stats_origin, ref_sha, extractor, options,
                        partial, started)
    finally:
        if partial is not None and partial.exists():
            partial.unlink()
    return result


def _on_disk(samples) -> bool:
    """Whether ``samples`` is a path (else an image reader made in process)."""
    return isinstance(samples, (str, os.PathLike))


def _name(samples) -> str:
    """A path as given, or an in-process reader's name."""
    return str(samples) if _on_disk(samples) else samples.name


def features_partial(path) -> Path:
    """Where ``--features PATH`` is written until it is complete (same directory, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _score(images, samples, ref_path, ref_pool, ref_stats, stats_origin, ref_sha, extractor, options, partial,
           started) -> dict:
    """Sample features, then every metric (rank 0, while the others wait through gloo: minutes for 50k samples and
    the extra families); the features file, when asked, is renamed into place last. {} on the other ranks."""
    # the extra families' features come from the ADM pass: an in-process reader generates its images once for all
    family_functions = batch_functions(options.families, extractor, options)
    extracted = extract(images, extractor, options.batch_size, "samples", options.progress,
                        None if partial is None else str(partial), options.features_out, options.feature_chunk,
                        family_functions)
    result = {}
    with main_phase("evaluate-metrics") as is_main:
        if is_main:  # under torchrun, rank 0 scores what every rank extracted
            result = _result(extracted, images, samples, ref_path, ref_pool, ref_stats, stats_origin, ref_sha,
                             extractor, options, partial, started, family_functions)
    return result


def _result(extracted, images, samples, ref_path, ref_pool, ref_stats, stats_origin, ref_sha, extractor, options,
            partial, started, family_functions) -> dict:
    """Rank 0: the metrics of the extracted features and their provenance (see _score)."""
    pool, logits, pool_stats, spatial_stats = extracted[:4]
    on_disk = _on_disk(samples)
    _warn_about(len(images), _labels_of(samples) if on_disk else images.labels.numpy())
    device = next(extractor.parameters()).device
    with deterministic_kernels(device):  # float64 linear algebra sums by thread count too: one thread on a CPU
        fid, sfid, isc, splits, prec, rec = _metrics(pool, logits, pool_stats, spatial_stats, ref_pool, ref_stats,
                                                     options, device)
    import torch_fidelity

    result = {
        "fid": fid, "sfid": sfid, "inception_score": isc, "precision": prec, "recall": rec,
        "n": len(images), "is_splits": splits, "samples": _name(samples),
        "samples_sha256": file_sha256(samples) if on_disk else None,
        "reference": str(ref_path), "reference_sha256": ref_sha, "reference_statistics": stats_origin,
        "inception_weights": extractor.weights_path, "inception_weights_sha256": extractor.weights_sha256,
        "fid_backend": options.fid_backend, "pr_precision": options.pr_precision,
        "feature_chunk": options.feature_chunk,
        "resize": "TF1 bilinear to 299 (torch-fidelity inception-v3-compat)",
        "torch_fidelity_version": torch_fidelity.__version__, "device": str(device), "tf32": False,
        "environment": environment(device),  # the features: strict fp32 (no_tf32), one thread per call on a CPU
        "sample_info": sample_provenance(samples) if on_disk else images.provenance(),
    }
    if extracted.extra:
        result["families"] = score_families(extracted.extra, family_functions, options.families, ref_path,
                                            options.batch_size, options.fid_backend)
    result["seconds"] = time.time() - started
    if partial is not None and partial.exists():
        _finish_features(partial, options.features_out, result)
    return result


def _metrics(pool, logits, pool_stats, spatial_stats, ref_pool, ref_stats, options, device) -> tuple:
    """(FID, sFID, IS, IS splits, precision, recall) of the extracted features against the reference's."""
    mu, sigma = pool_stats.mean_cov()
    mu_s, sigma_s = spatial_stats.mean_cov()
    on = device if options.fid_backend == "eigh" else None
    fid, sfid = side_by_side(  # two 2048-d eigendecompositions: on a CPU each on one thread, on a GPU in turn
        lambda: frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"], options.fid_backend, on),
        lambda: frechet_distance(mu_s, sigma_s, ref_stats["mu_s"], ref_stats["sigma_s"], options.fid_backend, on),
        device=on or "cpu")
    isc, splits = inception_score(logits)
    prec, rec = precision_recall(torch.from_numpy(ref_pool).to(device), torch.from_numpy(pool).to(device),
                                 block=options.pr_block, precision=options.pr_precision)
    return fid, sfid, isc, splits, prec, rec


def _finish_features(partial: Path, final, result: dict) -> None:
    """Write the results as attributes of the features file, then rename it into place."""
    import h5py

    try:
        f = h5py.File(partial, "a")
    except (OSError, RuntimeError) as exc:
        raise write_error(final, exc) from None
    try:
        f.attrs.update({k: str(v) for k, v in result.items()})
        f.close()
    except (OSError, RuntimeError) as exc:
        abandon_h5(f)
        raise write_error(final, exc) from None
    os.replace(partial, final)


def sample_provenance(path) -> dict:
    """What `reglue sample` recorded about these samples (samples.h5 itself, or the one beside an .npz)."""
    import json

    import h5py

    path = Path(path)
    h5 = path if path.suffix in (".h5", ".hdf5") else path.with_name("samples.h5")
    if not h5.is_file():
        return {}
    try:
        with h5py.File(h5, "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except OSError:
        return {}
    keys = ("preset", "step", "decoder", "quantisation", "checkpoint", "num_classes", "nfe", "guide_sha256")
    info = {k: attrs[k] for k in keys if k in attrs}
    for key in ("settings", "environment", "stand_ins", "ema"):  # older samples lack the last three
        if key in attrs:
            info[key] = json.loads(attrs[key])
    return info


def _labels_of(path) -> np.ndarray | None:
    path = Path(path)
    if path.suffix not in (".h5", ".hdf5"):
        return None
    import h5py

    with h5py.File(path, "r") as f:
        return f["labels"][...] if "labels" in f else None
