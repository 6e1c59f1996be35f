"""Reference batches: the registry in reference_stats/registry.yaml, download with checksum, or a local path."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from evaluation.determinism import deterministic_kernels
from evaluation.errors import InputError
from evaluation.extract import FEATURE_CHUNK, POOL_DIM, SPATIAL_DIM, BlockStatistics, call_workers, chunk_features
from evaluation.fileio import write_error
from evaluation.images import ImageInputError, file_sha256, open_images

REFERENCE_DIR_ENV = "REGLUE_REFERENCE_DIR"  # where named reference batches are looked for and downloaded to
REGISTRY = Path(__file__).resolve().parents[1] / "reference_stats" / "registry.yaml"


class ReferenceStatsError(InputError, ValueError):
    """A reference batch that cannot be found or verified."""


def registry() -> dict:
    """Name -> entry (file, url, sha256, images, source)."""
    return yaml.safe_load(REGISTRY.read_text())


def reference_dir() -> Path:
    """Where named reference batches live: $REGLUE_REFERENCE_DIR or ~/.cache/reglue/reference."""
    return Path(os.environ.get(REFERENCE_DIR_ENV, Path.home() / ".cache" / "reglue" / "reference"))


def reference_for(side: int) -> str:
    """The registry's ImageNet reference batch for ``side`` px samples (imagenet256, imagenet512)."""
    name = f"imagenet{side}"
    if name not in registry():
        raise ReferenceStatsError(f"no ImageNet reference batch for {side} px samples in the registry "
                                  f"({', '.join(registry())}); pass --ref NAME|PATH")
    return name


def resolve_reference(ref: str, download: bool = True) -> Path:
    """A local .npz for ``ref``: an existing path, or a registry name (downloaded and checked when missing)."""
    path = Path(ref)
    if path.exists():
        return path
    entries = registry()
    if ref not in entries:
        raise ReferenceStatsError(f"reference {ref!r}: no such file, and not one of {', '.join(entries)}")
    entry = entries[ref]
    target = reference_dir() / entry["file"]
    if target.exists():
        return target
    if not download:
        raise ReferenceStatsError(f"reference {ref}: {target} is missing")
    return _download(entry, target, ref)


def check_reference(path) -> None:
    """InputError unless ``path`` opens as the evaluator opens a reference: arr_0 uint8 (N, H, W, 3) with N >= 2 and
    well-formed stored statistics, if any (a bad file fails before any sampling)."""

    images = open_images(path, role="reference")
    if len(images) < 2:
        raise ImageInputError(f"{path}: {len(images)} reference image(s); the metrics need at least 2")
    images.statistics()


def _download(entry: dict, target: Path, name: str) -> Path:

    import torch


    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    try:
        torch.hub.download_url_to_file(entry["url"], str(tmp), progress=True)
    except Exception as exc:  # noqa: BLE001 - any network failure gets the same advice
        raise ReferenceStatsError(
            f"cannot download reference {name} ({type(exc).__name__}); fetch {entry['url']} elsewhere and put it at "
            f"{target} (or set {REFERENCE_DIR_ENV}), or pass --ref PATH") from None
    if entry.get("sha256") and file_sha256(tmp) != entry["sha256"]:
        tmp.unlink()
        raise ReferenceStatsError(f"reference {name}: checksum mismatch after download")
    tmp.replace(target)
    return target


REFERENCE_SUBSET = 10_000  # ADM's reference batches keep 10k images for precision/recall


def _write_npz_member(zf, name: str, array_or_shape, blocks=None) -> None:
    """Write one .npy member: a whole array, or a uint8 shape filled from ``blocks`` (streamed)."""
    import numpy as np

    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
        if blocks is None:
            np.lib.format.write_array(member, np.ascontiguousarray(array_or_shape), version=(2, 0))
            return
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": tuple(array_or_shape)}
        np.lib.format.write_array_header_2_0(member, header)
        for block in blocks:
            member.write(np.ascontiguousarray(block, dtype=np.uint8).tobytes())


def streamed_statistics(images, extractor, batch_size: int, chunk: int, progress: bool):
    """(pool, spatial RunningStats, images counted) of a reader too large to hold its features: the evaluator's chunk
    loop (evaluation.extract.chunk_features: fixed zero-padded chunks of ``chunk`` images) streams its rows into
    float64 statistics over fixed STATS_BLOCK blocks in index order, so ``batch_size`` never changes a bit."""
    from tqdm import tqdm


    pool, spatial = BlockStatistics(POOL_DIM), BlockStatistics(SPATIAL_DIM)  # summed on the CPU
    device = next(extractor.parameters()).device
    workers = call_workers(device)
    chunk = max(1, min(chunk, len(images)))
    n = 0
    with tqdm(total=len(images), desc="reference", unit="img", disable=not progress) as bar, \
            deterministic_kernels(device):
        for part, features in chunk_features(images.batches(batch_size), extractor, chunk, workers):
            pool.add(features.pool.cpu().numpy())
            spatial.add(features.spatial.cpu().numpy())
            n += len(part)
            bar.update(len(part))
        return pool.finish(), spatial.finish(), n


def make_reference(images, extractor, out, subset: int = REFERENCE_SUBSET, seed: int = 0, batch_size: int = 64,
                   progress: bool = True, chunk: int | None = None) -> dict:
    """An ADM-format reference batch from any image reader: statistics over all images, ``arr_0`` a seeded subset.

    The features come in fixed chunks of ``chunk`` images (default: evaluation.extract.FEATURE_CHUNK), so
    ``batch_size`` (how many images are read at a time) never changes them. A reader may leave out images it cannot
    decode (``skipped``, counted in the result): the images counted are those its first pass yields, and the
    subset is drawn from them (both passes skip the same ones)."""
    import zipfile

    import numpy as np


    out = Path(out)
    _check_count(len(images), 0)
    out.parent.mkdir(parents=True, exist_ok=True)  # before the features: a bad path fails at once
    pool, spatial, n = streamed_statistics(images, extractor, batch_size, chunk or FEATURE_CHUNK, progress)
    skipped = len(getattr(images, "skipped", ()))
    _check_count(n, skipped)
    keep = np.sort(np.random.default_rng(seed).permutation(n)[: min(subset, n)])
    (mu, sigma), (mu_s, sigma_s) = pool.mean_cov(), spatial.mean_cov()

    def subset_blocks():
        start = 0
        for batch in images.batches(batch_size):
            rows = keep[(keep >= start) & (keep < start + len(batch))] - start
            start += len(batch)
            if len(rows):
                yield batch[rows]

    tmp = out.with_name(out.name + ".partial")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npz_member(zf, "arr_0", (len(keep), *images.shape[1:]), subset_blocks())
            for name, value in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s)):
                _write_npz_member(zf, name, value)
        tmp.replace(out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(out, exc) from None
        raise
    return {"n": n, "subset": len(keep), "out": str(out), "skipped": skipped}


def _check_count(n: int, skipped: int) -> None:
    """ImageInputError unless there are at least 2 images (``skipped``: left out as undecodable)."""
    if n < 2:

        note = f" ({skipped} more could not be decoded)" if skipped else ""
        raise ImageInputError(f"{n} image(s){note}: a reference needs at least 2 (its statistics are a covariance)")
