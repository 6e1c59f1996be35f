"""Reading ImageNet's ILSVRC2012_img_train.tar in place, against the extracted folder it would otherwise become.

Writes --classes per-class tars of --per-class small JPEG-sized files into one outer tar, and the same files as a
folder tree; then times (1) indexing each source with `open_source` and (2) reading every image's bytes in a
shuffled order. Prints entries/s and the ratio to the folder. The index rate, scaled to 1,281,167 images,
estimates the one-off cost of indexing the real file. Run: python benchmarks/nested_tar.py [--classes 100]
"""

from __future__ import annotations

import argparse
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

from reglue.data.sources import open_source

IMAGENET_TRAIN_IMAGES = 1_281_167


def build(root: Path, classes: int, per_class: int, size: int) -> tuple[Path, Path]:
    """The outer tar of class tars and the equivalent folder tree, with the same random-content files."""
    folder, outer_path = root / "train", root / "ILSVRC2012_img_train.tar"
    with tarfile.open(outer_path, "w") as outer:
        for c in range(classes):
            synset = f"n{c:08d}"
            (folder / synset).mkdir(parents=True)
            for i in range(per_class):
                (folder / synset / f"{synset}_{i}.JPEG").write_bytes(os.urandom(size))
            with tarfile.open(root / f"{synset}.tar", "w") as inner:
                for path in sorted((folder / synset).iterdir()):
                    inner.add(path, arcname=path.name)
            outer.add(root / f"{synset}.tar", arcname=f"{synset}.tar")
            (root / f"{synset}.tar").unlink()
    return outer_path, folder


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def read_all(source) -> int:
    reader, order = source.reader(), list(range(len(source)))
    random.Random(0).shuffle(order)
    return sum(len(reader.read(i)) for i in order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--size", type=int, default=4096, help="bytes per file (ImageNet's mean JPEG is ~110 KB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outer, folder = build(Path(tmp), args.classes, args.per_class, args.size)
        n = args.classes * args.per_class
        (ref, t_ref_index), (ours, t_index) = timed(lambda: open_source(folder)), timed(lambda: open_source(outer))
        assert ref.labels == ours.labels and len(ours) == n
        bytes_ref, t_ref_read = timed(lambda: read_all(ref))
        bytes_ours, t_read = timed(lambda: read_all(ours))
        assert bytes_ref == bytes_ours
    print(f"{n:,} images in {args.classes} class tars, {args.size:,} bytes each (files cached by the OS)")
    print(f"index : folder {n / t_ref_index:10,.0f} entries/s   nested tar {n / t_index:10,.0f} entries/s   "
          f"ratio {t_ref_index / t_index:.2f}x")
    print(f"read  : folder {n / t_ref_read:10,.0f} images/s    nested tar {n / t_read:10,.0f} images/s    "
          f"ratio {t_ref_read / t_read:.2f}x")
    print(f"indexing the real ILSVRC2012_img_train.tar at this rate: about {IMAGENET_TRAIN_IMAGES * t_index / n:.0f} s "
          "(once, by rank 0, before encoding starts)")


if __name__ == "__main__":
    main()
