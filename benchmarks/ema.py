"""What post-hoc EMA costs a training run (docs/ema.md): tracking the power-function profiles after every optimiser
step and writing one snapshot, each as a fraction of the training step it rides on, measured in the same process
on the same model (random weights, synthetic inputs of the preset's shapes).

Run: python benchmarks/ema.py --preset sit-b2-reglue [--batch 8] [--profiles 0.05,0.10] [--device cuda]
Goal (issue 25): tracking two profiles under 3% of an XL/2 step on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import timed, training_step  # noqa: E402

from reglue import presets  # noqa: E402
from reglue.ema.snapshots import save_snapshot  # noqa: E402
from reglue.ema.tracking import PowerEMA  # noqa: E402
from reglue.models import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sit-b2-reglue")
    parser.add_argument("--batch", type=int, default=8, help="images per training step")
    parser.add_argument("--profiles", default="0.05,0.10", help="sigma_rel of the tracked profiles")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sigma_rels = tuple(float(s) for s in args.profiles.split(","))
    config = presets.load(args.preset, ema__sigma_rels=list(sigma_rels), ema__snapshot_every=1)

    step = training_step(config, args.batch, device, compiled=False)  # the reference: one full step (with the
    step_s = timed(step, args.repeats, device)  # classic EMA, as every run has)
    model = build(config).to(device)
    power = PowerEMA(model, sigma_rels)
    counter = iter(range(1, 10**9))
    track_s = timed(lambda: power.update(model, next(counter)), max(args.repeats, 5), device)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = save_snapshot(tmp, 1, power, config.ema.snapshot_precision, config)
        write_s, size = time.perf_counter() - start, path.stat().st_size
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}, {params / 1e6:.0f}M parameters, batch {args.batch}, {device.type} "
          f"({torch.get_num_threads()} threads), profiles {', '.join(map(str, sigma_rels))}")
    print(f"training step (reference)      {step_s * 1e3:10.1f} ms   1.000")
    print(f"track {len(sigma_rels)} profiles, one step    {track_s * 1e3:10.1f} ms   {track_s / step_s:.3f} of a step")
    print(f"write one snapshot ({size / 2**30:.2f} GiB)  {write_s * 1e3:10.1f} ms   {write_s / step_s:.1f} steps")


if __name__ == "__main__":
    main()
