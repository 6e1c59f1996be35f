"""One table of what a preset costs on the device at hand: a training step (eager and compiled), the sampler, the
VAE decoder and the Inception features, with images/s, the transformer's TFLOP/s, MFU on a known GPU, and peak
memory. Random weights in the real architectures (no download), synthetic inputs of the preset's shapes.

Run: python benchmarks/bench.py --preset sit-b2-reglue [--batch 32] [--steps 8] [--device cuda] [--no-compile]
On one H200 it is meant to take under 8 minutes for sit-b2-reglue and sit-xl2-reglue (docs/performance.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.inception import InceptionFeatures, random_weights_file  # noqa: E402
from reglue import presets  # noqa: E402
from reglue.constants import VAE_DOWNSAMPLE  # noqa: E402
from reglue.models import build  # noqa: E402
from reglue.models.flops import forward_gflops  # noqa: E402
from reglue.sampling.run import SampleRequest, integrate  # noqa: E402
from reglue.training.state import autocast, make_optimizer, update_ema  # noqa: E402
from reglue.training.throughput import FLOPS_PER_MAC, peak_tflops, training_figures  # noqa: E402
from reglue.transport import JointLoss  # noqa: E402
from reglue.transport.path import get_path  # noqa: E402


def timed(step, repeats: int, device) -> float:
    """Median seconds of ``step()`` over ``repeats`` calls after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def training_step(config, batch: int, device, compiled: bool):
    """A closure running one full training step (joint loss, backward, AdamW, EMA) on synthetic inputs."""
    model = build(config).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    net = torch.compile(model) if compiled else model
    optimizer = make_optimizer(model, config.optim)
    cfg = model.config
    loss_fn = JointLoss(config.loss, config.transport.path, config.transport.time_sampler, cfg.latent_channels)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(device)
    cls0 = torch.randn(batch, cfg.cls_dim, generator=gen).to(device) if cfg.cls_token else None
    y = torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=gen).to(device)
    repa = None
    if cfg.projector is not None:
        with torch.no_grad():
            t0 = torch.rand(batch, device=device)
            out = model(x0, t0, y, cls=cls0, return_projections=True)
        repa = torch.randn_like(out.projections)

    def step():
        with autocast(device, config.train.precision):
            terms = loss_fn(net, x0, y, cls0=cls0, repa_target=repa)
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, config.ema.decay)
    return step


def sampling_pass(config, batch: int, device, steps: int):
    """A closure integrating ``batch`` samples over ``steps`` steps with the preset's guidance."""
    model = build(config).to(device).eval()
    settings = SampleRequest(n=batch, steps=steps).resolve(config.sampling)[0]
    labels = torch.zeros(batch, dtype=torch.long)
    seeds = list(range(batch))
    path = get_path(config.transport.path)
    return lambda: integrate(model, settings, seeds, labels, device, path), settings


def decoder_pass(batch: int, device, side: int):
    """A closure decoding ``batch`` latents with SD-VAE's decoder architecture (random weights)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=side).to(device).eval()
    z = torch.randn(batch, 4, side // VAE_DOWNSAMPLE, side // VAE_DOWNSAMPLE, device=device)
    return lambda: vae.decode(z).sample


def inception_pass(batch: int, device, side: int):
    """A closure computing ADM's Inception features of ``batch`` uint8 images."""
    extractor = InceptionFeatures(random_weights_file(), device=device)
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=device)
    return lambda: extractor(images)


def row(stage: str, setting: str, images_per_s: float, tflops: float | None, peak: float | None, device) -> list:
    """One table row; memory is the peak since the last reset (CUDA only)."""
    memory = ""
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
        torch.cuda.reset_peak_memory_stats(device)
    return [stage, setting, f"{images_per_s:.1f}", "" if tflops is None else f"{tflops:.1f}",
            "" if not (peak and tflops) else f"{tflops / peak:.1%}", memory]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sit-b2-reglue")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed repeats of each measurement")
    parser.add_argument("--sample-steps", type=int, default=10, help="sampler steps per timed pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = presets.load(args.preset)
    gflops = forward_gflops(config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, config.train.precision, config.train.tf32) if device.type == "cuda" else None
    side = config.model.input_size * VAE_DOWNSAMPLE
    print(f"# {args.preset} ({gflops:.1f} GFLOPs forward), batch {args.batch}, {name}, torch {torch.__version__}")
    print("| stage | setting | img/s | TFLOP/s | MFU | peak GiB |\n|---|---|---|---|---|---|")
    emit = lambda cells: print("| " + " | ".join(map(str, cells)) + " |", flush=True)  # noqa: E731
    emit(train_row(config, args, device, gflops, peak, compiled=False))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # sampling: strict fp32
    with torch.no_grad():
        step, settings = sampling_pass(config, args.batch, device, args.sample_steps)
        seconds = timed(step, max(2, args.steps // 4), device)
        guided = 2 if settings.guidance.scale != 1 else 1  # rows per sample inside the interval (upper bound)
        per_image = seconds / args.batch / args.sample_steps
        tflops = gflops * FLOPS_PER_MAC * guided / per_image / 1e3
        full = config.sampling.steps  # the preset's own step count (250 for the paper presets)
        emit(row("sample", f"{settings.sampler}, cfg {settings.guidance.scale:g}, fp32; img/s at "
                 f"{full} steps", 1 / (per_image * full), tflops, None, device))  # strict fp32: no tensor-core peak
        seconds = timed(decoder_pass(args.batch, device, side), max(2, args.steps // 4), device)
        emit(row("decode", f"SD-VAE decoder, {side} px", args.batch / seconds, None, None, device))
        seconds = timed(inception_pass(args.batch, device, side), max(2, args.steps // 4), device)
        emit(row("eval", "Inception (ADM features), fp32", args.batch / seconds, None, None, device))
    if not args.no_compile:  # last: compiling takes the longest, and the rows above are printed already
        emit(train_row(config, args, device, gflops, peak, compiled=True))


def train_row(config, args, device, gflops: float, peak: float | None, compiled: bool) -> list:
    """The training step's row, under the precision flags `reglue train` sets."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(config.train.tf32)
    seconds = timed(training_step(config, args.batch, device, compiled), args.steps, device)
    figures = training_figures(args.batch / seconds, gflops, peak)
    return row("train", f"{config.train.precision}, {'compiled' if compiled else 'eager'}",
               figures["images_per_s"], figures["tflops_per_s"], peak, device)


if __name__ == "__main__":
    main()
