"""Generate-and-score in one process against what users run today: `reglue sample` to disk, then `reglue eval`.

Both on the same checkpoint, settings and reference, in this process, alternating; the reference features are
computed once beforehand (both paths read the same cache). Prints wall times, their ratio, and whether the two
give the same features. Default: a random tiny-reglue checkpoint, the tiny VAE and random Inception weights
(speed does not depend on the values); on a GPU pass --preset sit-b2-reglue --resolution 256 for real sizes.
Run: python benchmarks/generate_score.py [--n 64] [--steps 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from evaluation.evaluate import EvalOptions, evaluate  # noqa: E402
from reglue import checkpoints, presets  # noqa: E402
from reglue.models import build  # noqa: E402
from reglue.sampling.run import SampleSettings, sample_to_dir  # noqa: E402
from reglue.scoring.generate_and_score import score_checkpoint  # noqa: E402
from reglue.transport.samplers import Guidance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-reglue")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="reglue-bench-"))
    os.environ["REGLUE_FEATURE_CACHE"] = str(root / "cache")
    config = presets.load(args.preset)
    torch.manual_seed(0)
    ckpt = root / "ckpt.pt"
    checkpoints.save_checkpoint(ckpt, config=config, step=1, model=build(config), ema=build(config))
    side = config.model.input_size * 8
    ref = root / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (args.n, side, side, 3), dtype=np.uint8))
    vae = "tiny" if config.data.vae_decoder == "tiny" else None
    settings = SampleSettings(n=args.n, steps=args.steps, vae=vae, guidance=Guidance(scale=2.0, interval=(0, 0.9)))
    options = EvalOptions(device=args.device, progress=False, features_out=None)
    evaluate(str(ref), str(ref), "random", options)  # warm the reference cache and the libraries
    times = {"sample + eval": [], "in process": []}
    fids = {}
    for _ in range(args.repeats):
        out = root / "samples"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        sample_to_dir(ckpt, out, settings, batch_size=64, progress=False)
        fids["sample + eval"] = evaluate(str(out / "samples.npz"), str(ref), "random", options)["fid"]
        times["sample + eval"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fids["in process"] = score_checkpoint(ckpt, settings, str(ref), "random", options)["fid"]
        times["in process"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    print(f"{args.preset}, {args.n} samples x {args.steps} steps, device {args.device}, best of {args.repeats}: "
          f"sample + eval {best['sample + eval']:.1f} s, in process {best['in process']:.1f} s, ratio "
          f"{best['sample + eval'] / best['in process']:.2f}x; same FID: {fids['sample + eval'] == fids['in process']}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
