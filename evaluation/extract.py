"""Inception features of every image, the same bits for any --batch-size and any number of processes.

By construction (as the sampler does for pixels): images are cut into fixed chunks of ``FEATURE_CHUNK``
consecutive indices, and every network call sees exactly one chunk, zero-padded to full size, so a kernel that
picks its algorithm by batch size sees the same shapes everywhere (torch-fidelity issue 43: Inception features
move with the batch size). Processes take contiguous runs of whole chunks; the features are joined in index
order and the float64 statistics are summed over the same fixed blocks on every machine count. cuDNN does not
autotune, and on a CPU every call runs on one thread (oneDNN splits its sums by thread count; torchrun gives
each worker one): a process with several cores runs several chunks side by side instead.
``--batch-size`` only decides how many images are read per pass. Fewer images than a chunk make one unpadded
call (the chunk is min(FEATURE_CHUNK, N), a function of N alone). The chunk loop (``chunk_features``) and the
block statistics (``BlockStatistics``) are also --make-ref's (evaluation.reference), which streams its rows.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from evaluation.determinism import deterministic_kernels, side_by_side
from evaluation.fileio import abandon_h5, write_error
from evaluation.stats import RunningStats

FEATURE_CHUNK = 32  # default images per Inception call (padded): decides the features' last bits, as the sampler's
# chunk decides the pixels' (recorded in every result and in the reference cache's name)
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, 2023, 1008
STATS_BLOCK = 1024  # rows per float64 statistics update, over the joined features: fixed, so any split sums alike
FEATURE_NAMES = (("pool", POOL_DIM), ("spatial", SPATIAL_DIM), ("logits", LOGITS_DIM))


class Extracted(NamedTuple):
    """Every image's features in index order, and their float64 statistics."""

    pool: np.ndarray  # (N, 2048)
    logits: np.ndarray  # (N, 1008)
    pool_stats: RunningStats
    spatial_stats: RunningStats
    extra: dict[str, np.ndarray] = {}  # name -> (N, D): the other families' features, from the same images


class FeatureSink:
    """This process's rows of pool, spatial and logits in memory, and optionally every feature in HDF5.

    The HDF5 file is flushed after every chunk, so a failed write (a full disk) raises at once, as one OSError
    naming ``display`` (the user's --features), and the file is closed as the last flush left it."""

    def __init__(self, n: int, path: str | None = None, display: str | None = None):
        self.display = display or path  # the path named in errors (the user's --features, not its temporary)
        self.rows = {name: np.zeros((n, dim), np.float32) for name, dim in FEATURE_NAMES}
        self.h5, self.columns = None, {}
        if path:
            import h5py

            try:
                self.h5 = h5py.File(path, "w")
                for name, dim in FEATURE_NAMES:
                    self.columns[name] = self.h5.create_dataset(name, (n, dim), np.float32, chunks=(min(n, 256), dim))
                self.h5.flush()
            except (OSError, RuntimeError) as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException):
        if self.h5 is not None:
            abandon_h5(self.h5)  # first: dropping the dataset handles would retry their writes
            self.columns.clear()
        raise write_error(self.display, exc) from None

    def add(self, start: int, features) -> None:
        """Store one chunk of Features at rows [start, start + B)."""
        end = start + features.pool.shape[0]
        for name, _ in FEATURE_NAMES:
            self.rows[name][start:end] = getattr(features, name).cpu().numpy()
        if self.h5 is not None:
            try:
                for name, _ in FEATURE_NAMES:
                    self.columns[name][start:end] = self.rows[name][start:end]
                self.h5.flush()
            except (OSError, RuntimeError) as exc:
                self._fail(exc)

    def close(self) -> None:
        """Finish the HDF5 file, if any (evaluate() adds the results as attributes afterwards)."""
        if self.h5 is not None and self.h5.id.valid:
            try:
                self.columns.clear()
                self.h5.close()
            except (OSError, RuntimeError) as exc:
                self._fail(exc)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def chunk_ranges(n: int, size: int = FEATURE_CHUNK) -> list[range]:
    """Indices 0..n-1 cut into consecutive chunks of ``size`` (the last one shorter)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def rank_share(n: int, rank: int, world: int, chunk: int = FEATURE_CHUNK) -> range:
    """The contiguous run of whole chunks that process ``rank`` of ``world`` extracts."""
    chunks = -(-n // chunk)
    first, last = chunks * rank // world, chunks * (rank + 1) // world
    return range(min(first * chunk, n), min(last * chunk, n))


def _padded(batch: np.ndarray, chunk: int, device) -> torch.Tensor:
    """uint8 (b, H, W, 3) -> (chunk, 3, H, W) on ``device``, zero rows after the b real ones."""
    x = torch.zeros((chunk, *batch.shape[1:]), dtype=torch.uint8)
    x[: len(batch)] = torch.from_numpy(np.ascontiguousarray(batch))
    return x.permute(0, 3, 1, 2).to(device)


def _gather_rows(local: np.ndarray, counts: list[int]) -> np.ndarray:
    """Concatenate every rank's rows in rank order (padded all_gather)."""
    import torch.distributed as dist

    if len(counts) == 1:
        return local
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=torch.float32, device=device)
    padded[: len(local)] = torch.from_numpy(local)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)])


class BlockStatistics:
    """float64 mean/covariance accumulators of rows that arrive in any sizes, updated over fixed STATS_BLOCK blocks
    in index order (on ``device``), so any split of the rows (reads, chunks, machines) gives the same bits."""

    def __init__(self, dim: int, device="cpu"):
        self.stats, self.device, self.block = RunningStats(dim), device, STATS_BLOCK
        self.pending: list[np.ndarray] = []
        self.held = 0

    def add(self, rows: np.ndarray) -> None:
        """Take the next rows (index order); every whole block among the held rows updates the statistics."""
        self.pending.append(rows)
        self.held += len(rows)
        if self.held < self.block:
            return
        joined = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        whole = self.held - self.held % self.block
        for start in range(0, whole, self.block):
            self._update(joined[start : start + self.block])
        self.pending, self.held = [joined[whole:]], self.held - whole

    def finish(self) -> RunningStats:
        """The statistics of every row added (the last, shorter block included)."""
        if self.held:
            self._update(np.concatenate(self.pending))
            self.pending, self.held = [], 0
        return self.stats

    def _update(self, block: np.ndarray) -> None:
        """One block into the float64 accumulators, on the statistics' device."""
        self.stats.update(torch.from_numpy(block).to(self.device))


def statistics(features: np.ndarray, device) -> RunningStats:
    """float64 mean/covariance accumulators over fixed STATS_BLOCK blocks in index order (any machine count)."""
    stats = BlockStatistics(features.shape[1], device)
    stats.add(features)
    return stats.finish()


def chunked(batches: Iterable[np.ndarray], chunk: int) -> Iterator[np.ndarray]:
    """Re-cut a stream of image batches (any sizes) into batches of exactly ``chunk`` images (the last shorter)."""
    held = None  # the images after the last whole chunk (fewer than ``chunk``)
    for batch in batches:
        if held is not None and len(held):
            batch = np.concatenate([held, batch])
        whole = len(batch) - len(batch) % chunk
        yield from (batch[start : start + chunk] for start in range(0, whole, chunk))
        held = batch[whole:]
    if held is not None and len(held):
        yield held


def call_workers(device) -> int:
    """Network calls run side by side: one per CPU thread on a CPU (each on one thread), one at a time on a GPU.
    Read it before deterministic_kernels, which leaves a CPU process one thread."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


def chunk_features(batches: Iterable[np.ndarray], extractor, chunk: int, workers: int) -> Iterator[tuple]:
    """(images, their Features) of consecutive chunks of ``chunk`` images cut from ``batches`` (uint8 (b, H, W, 3)
    of any sizes), in index order: every network call sees one chunk zero-padded to ``chunk`` rows, ``workers``
    calls side by side. The one chunk loop of the evaluator and of --make-ref; run it inside deterministic_kernels."""
    device = next(extractor.parameters()).device
    group = []
    for part in itertools.chain(chunked(batches, chunk), [None]):  # None: the end, run what is grouped
        if part is not None:
            group.append(part)
        if group and (part is None or len(group) == workers):
            calls = [lambda g=g: extractor(_padded(g, chunk, device)) for g in group]
            for images, features in zip(group, side_by_side(*calls, device=device, workers=workers)):
                yield images, type(features)(*(f[: len(images)] for f in features))
            group = []


def _with_extra_features(batches: Iterable[np.ndarray], extra: dict, rows: dict) -> Iterator[np.ndarray]:
    """``batches`` passed on, the ``extra`` families' features of each appended to ``rows`` first (same images)."""
    for batch in batches:
        for name, features_of in extra.items():
            rows[name].append(np.asarray(features_of(batch), np.float32))
        yield batch


def extract(images, extractor, batch_size: int = 64, desc: str = "features", progress: bool = True,
            features_out: str | None = None, features_display: str | None = None,
            chunk: int = FEATURE_CHUNK, extra: dict | None = None) -> Extracted:
    """Features of every image of a reader (``len``, ``batches(batch, start, stop)``), ``chunk`` images per network
    call; under torchrun each process takes a contiguous run of chunks and every process gets the joined result.

    ``extra``: name -> function of a uint8 (b, H, W, 3) batch giving (b, D) features, run on the same images in
    the same pass (the other metric families: an in-process reader generates its images once for all)."""
    rank, world = rank_world()
    n = len(images)
    chunk = max(1, min(chunk, n))  # fewer images than a chunk: no padding (still the same for any split)
    share = rank_share(n, rank, world, chunk)
    sink = FeatureSink(len(share), features_out if world == 1 else None, features_display)
    device = next(extractor.parameters()).device
    workers = call_workers(device)
    per_read = max(1, -(-batch_size // chunk), workers) * chunk  # whole chunks per read, one per CPU worker at least
    row, extra_rows = 0, {name: [] for name in extra or {}}
    batches = _with_extra_features(images.batches(per_read, share.start, share.stop), extra or {}, extra_rows)
    with tqdm(total=n, desc=desc, unit="img", disable=not (progress and rank == 0), dynamic_ncols=True) as bar, \
            deterministic_kernels(device):
        for part, features in chunk_features(batches, extractor, chunk, workers):
            sink.add(row, features)
            row += len(part)
            bar.update(len(part) * world)
        counts = [len(rank_share(n, r, world, chunk)) for r in range(world)]
        joined = {name: _gather_rows(sink.rows[name], counts) for name, _ in FEATURE_NAMES}
        empty = np.zeros((0, *images.shape[1:]), np.uint8)  # a rank without a share: (0, D) all the same
        others = {name: _gather_rows(np.concatenate(rows) if rows else np.asarray(extra[name](empty), np.float32),
                                     counts) for name, rows in extra_rows.items()}
        result = Extracted(joined["pool"], joined["logits"], statistics(joined["pool"], device),
                           statistics(joined["spatial"], device), others)
    sink.close()
    return result
