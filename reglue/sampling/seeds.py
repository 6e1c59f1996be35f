"""Per-sample randomness: every sample's labels and noise depend only on (seed, sample index).

So the same command gives the same images on 1 or 8 GPUs and with any batch size (the reference seeds each
rank with seed * world + rank, so its sample set changes with the GPU count).
"""

from __future__ import annotations

import torch

from reglue.errors import UserError

# Sample i of run seed s draws from torch.Generator().manual_seed(s * SEED_STRIDE + i). The CPU generator
# (mt19937) keeps only the low 32 bits of its seed, so the sum must stay below 2**32: 2**20 samples per seed and
# 2**12 seeds, every (seed, index) pair its own stream.
SEED_STRIDE = 1 << 20
MAX_SAMPLES = SEED_STRIDE
MAX_SEED = (1 << 32) // SEED_STRIDE - 1
LABEL_SALT = 0x5EED_1ABE1  # a separate stream for the uniform labels


class SampleError(UserError, ValueError):
    """Settings that cannot sample this model (guidance without labels, a class out of range ...)."""


def check_repeats(seed: int, repeats: int) -> None:
    """SampleError unless seeds seed .. seed + repeats - 1 all exist (`--repeats` of eval --ckpt and sweep, checked
    before anything is sampled; an absurd count allocates nothing)."""
    if repeats < 1 or seed + repeats - 1 > MAX_SEED:
        most = MAX_SEED - seed + 1
        raise SampleError(f"--repeats {repeats} from --seed {seed}: repeat k samples with seed {seed} + k and seeds go "
                          f"up to {MAX_SEED} (reglue.sampling.seeds); use --repeats 1..{most}")


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of run seed ``seed`` (distinct for every pair; see SEED_STRIDE)."""
    if not (0 <= seed <= MAX_SEED and 0 <= index < MAX_SAMPLES):
        raise SampleError(f"seed {seed}, sample {index}: seeds go from 0 to {MAX_SEED} and each gives at most "
                          f"{MAX_SAMPLES:,} samples (the generator keeps 32 bits of its seed)")
    return seed * SEED_STRIDE + index


def make_labels(n: int, num_classes: int, seed: int, balanced: bool, classes: list[int] | None = None) -> torch.Tensor:
    """Labels of samples 0..n-1: uniform per sample (as the reference), or balanced in a seeded random order; all 0
    for an unconditional model (num_classes 0: the model ignores them)."""
    if num_classes == 0:
        return torch.zeros(n, dtype=torch.long)
    pool = torch.tensor(classes if classes else range(num_classes), dtype=torch.long)
    if balanced:
        if n % len(pool):
            raise SampleError(f"--balanced needs N divisible by the number of classes ({len(pool)}), got N={n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return pool[order % len(pool)]
    picks = [int(torch.randint(len(pool), (1,), generator=torch.Generator().manual_seed(
        sample_seed(seed, i) ^ LABEL_SALT))) for i in range(n)]
    return pool[torch.tensor(picks, dtype=torch.long)]


class SampleNoise:
    """One generator per sample of a batch: the initial state, then the noise of each SDE step."""

    def __init__(self, seeds: list[int], x_shape: tuple, cls_dim: int | None, device):
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.x_shape, self.cls_dim, self.device = x_shape, cls_dim, device

    def _draw(self) -> tuple:
        x = torch.stack([torch.randn(self.x_shape, generator=g) for g in self.gens])
        cls = torch.stack([torch.randn(self.cls_dim, generator=g) for g in self.gens]) if self.cls_dim else None
        return x.to(self.device, torch.float64), None if cls is None else cls.to(self.device, torch.float64)

    def initial(self) -> tuple:
        """x (B, C, H, W) and cls (B, D) at t = 1."""
        return self._draw()

    def step(self, i: int) -> tuple:
        """(xi, cls_xi) of SDE step ``i`` (drawn in order: call once per step)."""
        return self._draw()
