"""The training loop's own speed against its model-only step: the gap is host work (data loading, the step's
noise, logging, checkpoint bookkeeping) that a GPU would wait for.

Both run reglue's own train_step on the same trainer: "loop" is `reglue train`'s loop end to end (DataLoader,
noise drawn ahead, logging every step), timed step to step by a callback; "model only" repeats train_step on
one batch already in memory with its noise already drawn. Prints images/s of each and the loop's share of the
model-only speed. Run: python benchmarks/train_loop.py [--preset tiny-sit] [--batch 32] [--steps 12]
[--device cpu|cuda] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from helpers import make_folder  # noqa: E402

from reglue import presets  # noqa: E402
from reglue.data.encode import EncodeOptions, encode_dataset  # noqa: E402
from reglue.data.sources import open_source  # noqa: E402
from reglue.encoders.vae import load_vae  # noqa: E402
from reglue.training.diffusion import (  # noqa: E402
    TrainOptions,
    _loader,
    _make_net,
    build_trainer,
    noise_source,
    train_diffusion,
    train_step,
)
from reglue.training.order import make_split  # noqa: E402
from reglue.transport import JointLoss  # noqa: E402


def toy_dataset(root: Path, resolution: int) -> Path:
    """A few hundred toy images encoded with the tiny stand-in VAE."""
    images = make_folder(root / "images", per_class=40, seed=5, corrupt=False)
    out = root / "data.h5"
    encode_dataset(open_source(images), out, *load_vae("tiny"), EncodeOptions(resolution=resolution, workers=0),
                   progress=False, log=lambda m: None)
    return out


def loop_seconds(config, options: TrainOptions) -> list[float]:
    """Seconds between consecutive steps of the real loop (the first, warm-up, interval dropped)."""
    marks: list[float] = []
    timer = (lambda trainer: marks.append(time.perf_counter()),)
    train_diffusion(config, TrainOptions(**{**options.__dict__, "callbacks": timer}))
    return [b - a for a, b in zip(marks[2:], marks[3:])]  # marks[0]: the callback before the first step


def model_only_seconds(config, options: TrainOptions, steps: int) -> list[float]:
    """Seconds per train_step on one batch and one draw of noise already in memory."""
    trainer = build_trainer(config, options)
    try:
        cfg = trainer.model.config
        split = make_split(config.train.global_batch, 1, options.batch_gpu)
        loss_fn = JointLoss(config.loss, config.transport.path, config.transport.time_sampler, cfg.latent_channels)
        net = _make_net(trainer)
        batches = [next(iter(_loader(trainer, split))) for _ in range(split.accum)]
        noise = noise_source(trainer, split)
        drawn = noise(0)
        noise.close()
        times = []
        for _ in range(steps + 1):
            if trainer.dist.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(trainer, net, loss_fn, batches, split, drawn)
            if trainer.dist.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return times[1:]
    finally:
        trainer.run.release()


def noise_wait(preset: str, batch: int, step_seconds: float = 0.2, steps: int = 6) -> tuple[float, float]:
    """(ms to draw a step's noise in place, ms the step waits for it when drawn ahead) at ``preset``'s shapes,
    the step's own work stood in for by a sleep of ``step_seconds``."""
    from reglue.training.order import NoiseAhead, step_noise
    from reglue.transport import sample_time

    config = presets.load(preset)
    m, tr = config.model, config.transport
    sampler = lambda n, g: sample_time(n, tr.time_sampler, tr.path, generator=g)  # noqa: E731
    draw = lambda s: step_noise(s, 0, batch, m.in_channels, m.latent_channels, m.input_size,  # noqa: E731
                                m.cls_dim if m.cls_token else None, m.class_dropout, sampler)
    in_place = []
    for s in range(steps):
        start = time.perf_counter()
        draw(s)
        in_place.append(time.perf_counter() - start)
    ahead, waited = NoiseAhead(draw), []
    ahead(0)
    for s in range(1, steps + 1):
        time.sleep(step_seconds)
        start = time.perf_counter()
        ahead(s)
        waited.append(time.perf_counter() - start)
    ahead.close()
    return statistics.median(in_place) * 1e3, statistics.median(waited) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-sit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = presets.load(args.preset)
        data = toy_dataset(root, base.data.resolution)
        config = presets.load(args.preset, train__max_steps=args.steps + 2, train__global_batch=args.batch,
                              train__log_every=1, train__sample_every=0, train__ckpt_every=10**6,
                              data__vae="tiny")  # the toy data is encoded with the tiny stand-in
        common = dict(data=str(data), workers=args.workers, progress=False, device=args.device, echo=lambda s: None)
        loop = statistics.median(loop_seconds(config, TrainOptions(outdir=str(root / "loop"), **common)))
        model = statistics.median(model_only_seconds(config, TrainOptions(outdir=str(root / "model"), **common),
                                                     args.steps))
    print(f"preset {args.preset}, batch {args.batch}, {args.device}, {args.workers} loader workers")
    print(f"model-only step: {args.batch / model:8.1f} img/s ({model * 1e3:.1f} ms)")
    print(f"training loop:   {args.batch / loop:8.1f} img/s ({loop * 1e3:.1f} ms)")
    print(f"loop / model-only: {model / loop:.3f}  (host work outside the step: {(loop - model) * 1e3:+.1f} ms a step)")
    drawn, waited = noise_wait("sit-b2-reglue", 256)
    print(f"sit-b2-reglue noise of a 256-image step: {drawn:.1f} ms drawn in place, {waited:.2f} ms waited when "
          "drawn ahead")


if __name__ == "__main__":
    main()
