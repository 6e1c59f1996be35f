"""Train the demo's VAE stand-in on a folder of toy images and save it as a diffusers folder (reglue.encoders.toy).

python scripts/toy_vae.py IMAGES_DIR OUT_DIR [--steps 300]  -> OUT_DIR/config.json (+ weights); reused when present
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from reglue.encoders.toy import ToyVAESettings, latent_std, save_toy_vae, train_toy_vae

NOTE = "toy autoencoder trained by the demo on its own images (scripts/toy_vae.py): a stand-in, not SD-VAE"


def read_images(folder: Path) -> np.ndarray:
    """Every PNG under ``folder`` in sorted order as uint8 (N, H, W, 3); exits 2 naming the folder when empty."""
    paths = sorted(folder.rglob("*.png"))
    if not paths:
        sys.exit(f"toy_vae.py: error: {folder}: no PNG images")
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=ToyVAESettings.steps)
    args = parser.parse_args()
    if (args.out / "config.json").is_file():
        print(f"{args.out}: already trained (delete it to train again)")
        return
    images = read_images(args.images)
    start = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if step % 50 == 0 or step == args.steps:
            print(f"toy VAE step {step}/{args.steps}: reconstruction loss {loss:.4f}", flush=True)

    vae = train_toy_vae(images, ToyVAESettings(steps=args.steps), progress)
    scale = 1.0 / latent_std(vae, images)
    save_toy_vae(vae, args.out, scale, NOTE)
    print(f"{args.out}: toy VAE stand-in, latent scale {scale:.5f}, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
