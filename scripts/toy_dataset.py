"""A deterministic class-conditional toy dataset for the demo: coloured shapes on textured backgrounds.

python scripts/toy_dataset.py OUT_DIR [--per-class 40] [--size 64]  -> OUT_DIR/<class>/<i>.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {"red": (220, 50, 40), "blue": (40, 80, 220)}
JITTER = 0.08  # the centre moves by at most this fraction of the side


def draw(shape: str, colour: tuple, size: int, rng: np.random.Generator) -> Image.Image:
    """One image: a shape of random scale near the centre (within JITTER of the side) over a smooth random
    background. Centred shapes let the demo's small models learn them in minutes on a CPU."""
    base = rng.integers(60, 200, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
    pen = ImageDraw.Draw(image)
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = size / 2 + rng.uniform(-JITTER, JITTER, 2) * size
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        pen.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
        pen.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=colour)
    else:
        pen.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for name, colour in COLOURS.items():
            folder = args.out / f"{shape}-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(args.per_class):
                path = folder / f"{i:04d}.png"
                image = draw(shape, colour, args.size, rng)
                if not path.exists():
                    image.save(path)
    print(f"{len(SHAPES) * len(COLOURS) * args.per_class} images in {args.out}")


if __name__ == "__main__":
    main()
