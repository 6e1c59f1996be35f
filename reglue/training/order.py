"""Data order and per-step randomness as pure functions of (seed, step): resume and any GPU count agree.

The global batch of step s is rows [s * B, (s + 1) * B) of an endless stream of permutations, epoch e being
``randperm(n)`` drawn from seed + e. Each rank reads its slice of it, split into micro-batches of batch_gpu.
Noise, times, label dropout and the posterior draw come from a generator seeded by (seed, step) for the
whole global batch; a rank uses its slice. So a run does not depend on the number of processes, and a resume
needs only the step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch.utils.data import Sampler


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def global_batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Dataset rows of step ``step`` (0-based), in order."""
    start, rows = step * global_batch, []
    while len(rows) < global_batch:
        epoch, offset = divmod(start + len(rows), n)
        take = min(global_batch - len(rows), n - offset)
        rows += _epoch_permutation(n, seed, epoch)[offset : offset + take].tolist()
    return rows


def data_position(step: int, n: int, global_batch: int) -> dict:
    """Where step ``step`` starts in the stream (recorded in checkpoints)."""
    epoch, offset = divmod(step * global_batch, n)
    return {"step": step, "epoch": epoch, "offset": offset}


@dataclass(frozen=True)
class Split:
    """How a global batch is divided: ``world`` ranks, each taking ``accum`` micro-batches of ``batch_gpu``."""

    global_batch: int
    world: int
    batch_gpu: int

    @property
    def per_rank(self) -> int:
        """Samples per rank per step."""
        return self.global_batch // self.world

    @property
    def accum(self) -> int:
        """Micro-batches per rank per step (gradient accumulation)."""
        return -(-self.per_rank // self.batch_gpu)

    def micro_slices(self, rank: int) -> list[slice]:
        """Positions within the global batch of this rank's micro-batches."""
        base = rank * self.per_rank
        return [slice(base + i, min(base + self.per_rank, base + i + self.batch_gpu))
                for i in range(0, self.per_rank, self.batch_gpu)]


def make_split(global_batch: int, world: int, batch_gpu: int | None) -> Split:
    """Validate and build the split; batch_gpu defaults to the whole per-rank batch."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
    per_rank = global_batch // world
    return Split(global_batch, world, min(batch_gpu or per_rank, per_rank))


class StepSampler(Sampler):
    """Yields this rank's micro-batches (lists of rows) for steps start..stop-1, for a DataLoader with
    batch_size=None."""

    def __init__(self, n: int, split: Split, rank: int, seed: int, start: int, stop: int):
        self.n, self.split, self.rank, self.seed, self.start, self.stop = n, split, rank, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.split.accum

    def __iter__(self):
        for step in range(self.start, self.stop):
            rows = global_batch_indices(step, self.n, self.split.global_batch, self.seed)
            for part in self.split.micro_slices(self.rank):
                yield rows[part]


@dataclass(frozen=True)
class StepNoise:
    """Every random draw of one step, for the whole global batch."""

    t: torch.Tensor  # (B,)
    drop: torch.Tensor  # (B,) bool label dropout
    posterior: torch.Tensor  # (B, 4, h, w) eps of the VAE posterior sample
    noise: torch.Tensor  # (B, C, h, w)
    cls_noise: torch.Tensor | None  # (B, D)
    flip: torch.Tensor | None = None  # (B,) bool: read the mirrored image and moments (data.flip)

    def take(self, part: slice, device) -> "StepNoise":
        """The slice for one micro-batch, on ``device`` (an asynchronous copy from pinned memory to a GPU)."""
        pick = lambda x: None if x is None else x[part].to(device, non_blocking=True)  # noqa: E731
        return StepNoise(pick(self.t), pick(self.drop), pick(self.posterior), pick(self.noise), pick(self.cls_noise),
                         pick(self.flip))

    def pinned(self) -> "StepNoise":
        """The same draws in page-locked host memory (what an asynchronous copy to a GPU needs)."""
        pin = lambda x: None if x is None else x.pin_memory()  # noqa: E731
        return StepNoise(pin(self.t), pin(self.drop), pin(self.posterior), pin(self.noise), pin(self.cls_noise),
                         pin(self.flip))


class NoiseAhead:
    """``draw(step)`` made one step ahead in a background thread while the current step trains: the same bits as
    drawing it in the step (a pure function of the step, its own generator), without the wait. ``pin``: in pinned
    memory, for the GPU copy."""

    def __init__(self, draw: Callable[[int], StepNoise], pin: bool = False):
        self._draw, self._pin = draw, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reglue-noise")
        self._ahead: tuple[int, Future] | None = None

    def _make(self, step: int) -> StepNoise:
        noise = self._draw(step)
        return noise.pinned() if self._pin else noise

    def __call__(self, step: int) -> StepNoise:
        """The draws of ``step``; those of ``step + 1`` start now."""
        if self._ahead is not None and self._ahead[0] == step:
            future = self._ahead[1]
        else:
            future = self._pool.submit(self._make, step)
        self._ahead = (step + 1, self._pool.submit(self._make, step + 1))
        return future.result()

    def close(self) -> None:
        """Stop the thread (a draw still running is finished and dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def flip_rows(images: torch.Tensor, moments: torch.Tensor, flip: torch.Tensor) -> tuple:
    """Where ``flip``: the mirrored image (N, 3, H, W) and the mirrored image's moments, stored after the plain ones
    in (N, 2 * M, h, w); elsewhere the plain image and moments (N, M, h, w)."""
    half = moments.shape[1] // 2
    rows = flip.view(-1, 1, 1, 1)
    return torch.where(rows, images.flip(-1), images), torch.where(rows, moments[:, half:], moments[:, :half])


def step_noise(step: int, seed: int, global_batch: int, channels: int, latent_channels: int, size: int,
               cls_dim: int | None, dropout: float, time_sampler, flip: bool = False) -> StepNoise:
    """Draw the randomness of step ``step`` (CPU generator: identical on every device and process count)."""
    gen = torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 1)
    t = time_sampler(global_batch, gen)
    drop = torch.rand(global_batch, generator=gen) < dropout
    posterior = torch.randn(global_batch, latent_channels, size, size, generator=gen)
    noise = torch.randn(global_batch, channels, size, size, generator=gen)
    cls_noise = torch.randn(global_batch, cls_dim, generator=gen) if cls_dim else None
    flips = torch.rand(global_batch, generator=gen) < 0.5 if flip else None  # drawn last: other draws unchanged
    return StepNoise(t, drop, posterior, noise, cls_noise, flips)
