"""Train the demo's VFM stand-in on a folder of toy class folders and save it as .safetensors (reglue.encoders.toy_vfm).

python scripts/toy_vfm.py IMAGES_DIR OUT_FILE [--steps 1000]  -> OUT_FILE, for --vfm-weights; reused when present
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from reglue.data.crop import crop_or_reason
from reglue.data.sources import SourceError, open_source
from reglue.encoders.toy_vfm import LOCAL_LAYERS, ToyVFMSettings, save_toy_vfm, train_toy_vfm

RESOLUTION = 64  # the demo encodes at 64 px (ADM centre crop); the VFM resizes to its own 56 px


def read_images(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Every image under ``folder``'s class folders, ADM-cropped to RESOLUTION, as uint8 (N, H, W, 3), with labels
    and class names as `reglue encode` assigns them (reglue.data.sources: sorted folder names); exits 2 naming the
    folder when it holds no images."""
    try:
        source = open_source(folder)
    except SourceError as exc:
        print(f"toy_vfm.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    reader, images, labels = source.reader(), [], []
    for i, key in enumerate(source.keys):
        image, reason = crop_or_reason(partial(reader.read, i), RESOLUTION)
        if image is None:
            print(f"toy_vfm.py: skipping {key}: {reason}", file=sys.stderr)
            continue
        images.append(image)
        labels.append(source.labels[i])
    if not images:
        print(f"toy_vfm.py: error: {folder}: no readable images", file=sys.stderr)
        sys.exit(2)
    return np.stack(images), np.asarray(labels), source.class_names


@torch.no_grad()
def held_in_accuracy(vfm, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Nearest-class-centroid accuracy on the training images of the [CLS] features and of the mean-pooled local
    maps (float64)."""
    batches = [torch.from_numpy(images[i:i + 256]).permute(0, 3, 1, 2) for i in range(0, len(images), 256)]
    features = [vfm(batch, list(LOCAL_LAYERS)) for batch in batches]
    result = []
    for part in (torch.cat([f.cls for f in features]), torch.cat([f.local.mean(dim=(2, 3)) for f in features])):
        x = part.double().numpy()
        centroids = np.stack([x[labels == k].mean(axis=0) for k in range(int(labels.max()) + 1)])
        nearest = ((x[:, None] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
        result.append(float(np.mean(nearest == labels)))
    return result[0], result[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=ToyVFMSettings.steps)
    args = parser.parse_args()
    if args.out.is_file():
        print(f"{args.out}: already trained (delete it to train again)")
        return
    images, labels, classes = read_images(args.images)
    start = time.perf_counter()

    def progress(step: int, loss: float, accuracy: float) -> None:
        if step % 200 == 0 or step == args.steps:
            print(f"toy VFM step {step}/{args.steps}: loss {loss:.3f}, batch accuracy {accuracy:.2f}", flush=True)

    vfm = train_toy_vfm(images, labels, ToyVFMSettings(steps=args.steps), progress)
    seconds = time.perf_counter() - start
    save_toy_vfm(vfm, args.out)
    cls, local = held_in_accuracy(vfm, images, labels)
    print(f"{args.out}: toy VFM stand-in, {len(images)} images of {len(classes)} classes, {seconds:.0f} s; held-in "
          f"nearest-centroid accuracy: [CLS] {cls:.3f}, local maps {local:.3f}")


if __name__ == "__main__":
    main()
