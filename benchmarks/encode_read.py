"""Training-read throughput: our HDF5 dataset against the reference layout (one PNG + one .npy per image).

Both are written here from the same images (smooth random 256x256 pictures) and moments, then read in a
shuffled order through a DataLoader with the same number of workers, as training reads them. Prints
samples/s for each and the ratio. Run: python benchmarks/encode_read.py [--images 2000] [--workers 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from reglue.data.dataset import EncodedDataset, batch_loader
from reglue.data.writer import EncodedWriter


def smooth_images(n: int, size: int, seed: int = 0):
    """Photo-like test images: low-frequency noise upsampled bicubically (PNG compresses them as it would photos)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8))
        yield np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))


def write_reference(root: Path, images: list, moments: np.ndarray) -> None:
    """The reference preprocessing's layout: images/00000/img00000000.png and vae-sd/00000/img-mean-std-*.npy."""
    for i, (image, m) in enumerate(zip(images, moments)):
        idx = f"{i:08d}"
        (root / "images" / idx[:5]).mkdir(parents=True, exist_ok=True)
        (root / "vae-sd" / idx[:5]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / idx[:5] / f"img{idx}.png", compress_level=0)
        np.save(root / "vae-sd" / idx[:5] / f"img-mean-std-{idx}.npy", m)


class ReferenceLayout(Dataset):
    """Reads the reference layout the way the reference's dataset class does (PIL decode + np.load)."""

    def __init__(self, root: Path, n: int):
        self.root, self.n = root, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        idx = f"{i:08d}"
        with open(self.root / "images" / idx[:5] / f"img{idx}.png", "rb") as f:
            image = np.array(Image.open(f)).transpose(2, 0, 1)
        moments = np.load(self.root / "vae-sd" / idx[:5] / f"img-mean-std-{idx}.npy")
        return torch.from_numpy(image), torch.from_numpy(moments), torch.tensor(0)


def write_ours(path: Path, images: list, moments: np.ndarray) -> None:
    """Our encoded HDF5 file, through the same writer `reglue encode` uses."""
    writer = EncodedWriter(path, "benchmark", images[0].shape[0], moments.shape[1:], "float32", False,
                           ["class0"], {"source": "benchmark", "vae": "none", "resolution": images[0].shape[0]})
    for start in range(0, len(images), 256):
        block = slice(start, start + 256)
        writer.append(np.stack(images[block]), moments[block], np.zeros(len(images[block]), np.int64),
                      [str(i) for i in range(start, start + len(images[block]))], position=start + 256)
    writer.finish()


def samples_per_second(make_loader, epochs: int) -> float:
    """Best epoch rate of a shuffled full pass (the first epoch also warms the page cache)."""
    best = 0.0
    for epoch in range(epochs):
        loader = make_loader(torch.Generator().manual_seed(epoch))
        start, count = time.perf_counter(), 0
        for images, _, _ in loader:
            count += images.shape[0]
        best = max(best, count / (time.perf_counter() - start))
    return best


def main() -> None:
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on a 2-core machine
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        images = list(smooth_images(args.images, args.resolution))
        latent = args.resolution // 8
        moments = np.random.default_rng(1).standard_normal((args.images, 8, latent, latent)).astype(np.float32)
        t0 = time.perf_counter()
        write_reference(root / "reference", images, moments)
        t1 = time.perf_counter()
        write_ours(root / "data.h5", images, moments)
        t2 = time.perf_counter()
        ref_files = sum(1 for _ in (root / "reference").rglob("*.*"))
        ref_bytes = sum(p.stat().st_size for p in (root / "reference").rglob("*.*"))
        print(f"{args.images} images at {args.resolution}px, {args.workers} workers, batch {args.batch}, "
              f"best of {args.epochs} shuffled epochs, {os.cpu_count()} CPUs")
        print(f"write  reference: {t1 - t0:6.1f} s, {ref_files} files, {ref_bytes / 2**20:7.1f} MiB")
        print(f"write  ours     : {t2 - t1:6.1f} s, 1 file,  {(root / 'data.h5').stat().st_size / 2**20:7.1f} MiB")
        reference = ReferenceLayout(root / "reference", args.images)
        ref = samples_per_second(lambda g: DataLoader(reference, batch_size=args.batch, shuffle=True, generator=g,
                                                      num_workers=args.workers), args.epochs)
        encoded = EncodedDataset(root / "data.h5")
        ours = samples_per_second(lambda g: batch_loader(encoded, args.batch, RandomSampler(encoded, generator=g),
                                                         args.workers), args.epochs)
        print(f"read   reference: {ref:8.1f} samples/s")
        print(f"read   ours     : {ours:8.1f} samples/s")
        print(f"ratio ours/reference: {ours / ref:.2f}x (goal: >= 3x)")


if __name__ == "__main__":
    main()
