"""What the alignment probe costs (docs/probe.md): N images x every block x the noise levels on a preset's model
(random weights, synthetic images and latents of the preset's shapes; the VFM side is the tiny stand-in, its grid
resampled to the model's: DINOv2 cannot be downloaded here and costs one pass per image, not per block or t),
split into the model passes and the metrics, against one training step of the same model in the same process.

Run: python benchmarks/probe.py --preset sit-b2 [--n 1024] [--device cuda]
Goal (issue 26): 1,024 images x all layers x 3 noise levels on a B/2 in under 60 s on one H200.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import timed, training_step  # noqa: E402

from reglue import presets  # noqa: E402
from reglue.encoders.vfm import load_vfm  # noqa: E402
from reglue.models import build  # noqa: E402
from reglue.probe import run as probe_run  # noqa: E402


class SyntheticData:
    """The encoded dataset's read_batch with random images, moments and labels of the preset's shapes."""

    def __init__(self, n: int, resolution: int, latent: int, classes: int):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, resolution, resolution), generator=gen, dtype=torch.uint8)
        self.moments = torch.randn(n, 8, latent, latent, generator=gen)
        self.labels = torch.randint(0, max(classes, 2), (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def read_batch(self, rows):
        return self.images[rows], self.moments[rows], self.labels[rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sit-b2", help="a preset without VFM inputs (its transformer is what the "
                                                           "probe runs; REGLUE's adds one VFM pass per image)")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = presets.load(args.preset)
    model = build(config).to(device).eval()
    data = SyntheticData(args.n, config.data.resolution, config.model.input_size, config.model.num_classes)
    vfm = load_vfm("tiny-dinov2", 56).to(device)
    settings = probe_run.ProbeSettings(n=args.n, batch_size=args.batch)
    calls = {"spatial": 0.0, "global": 0.0}
    for name, part in (("_spatial_cka", "spatial"), ("cknna", "global"), ("knn_accuracy", "global")):
        real = getattr(probe_run, name)

        def timed_metric(*a, _real=real, _part=part, **k):
            start = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                calls[_part] += time.perf_counter() - start
        setattr(probe_run, name, timed_metric)
    start = time.perf_counter()
    result = probe_run.probe(model, config, data, None, vfm, settings, device)
    total = time.perf_counter() - start
    step_s = timed(training_step(presets.load(args.preset), 8, device, compiled=False), 2, device)
    cells = len(result["layers"]) * len(result["t"])
    print(f"{args.preset} ({config.model.depth} blocks), N {args.n}, {len(result['t'])} noise levels, {device.type} "
          f"({torch.get_num_threads()} threads)")
    print(f"probe, all of it       {total:8.1f} s   ({cells} cells; {total / step_s:.0f} training steps at batch 8)")
    print(f"  spatial CKA          {calls['spatial']:8.1f} s   (one CKA per image per cell)")
    print(f"  CKNNA and k-NN       {calls['global']:8.1f} s   (over {args.n} images per cell)")
    print(f"  the rest             {total - calls['spatial'] - calls['global']:8.1f} s   (model passes and hooks, CKA)")
    print(f"  mean CKNNA {np.mean(result['metrics']['cknna']):.3f} (random weights: near 0)")


if __name__ == "__main__":
    main()
