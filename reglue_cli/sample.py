"""`reglue sample`: N images from a checkpoint as samples.h5 + the ADM samples.npz."""

from __future__ import annotations

import math
from pathlib import Path

import click

from reglue.distributed import init_distributed, shutdown
from reglue.sampling.run import DEFAULT_CHUNK, SampleRequest, sample_to_dir, write_grid
from reglue.transport.samplers import SAMPLERS
from reglue_cli.errors import check_device, fail


def parse_interval(text: str) -> tuple[float, float]:
    """'LOW,HIGH' -> (low, high) within [0, 1]."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"--interval {text!r}: expected LOW,HIGH, e.g. 0,0.9")
    if not 0.0 <= low <= high <= 1.0:
        fail(f"--interval {text}: needs 0 <= LOW <= HIGH <= 1 (t = 1 is noise)")
    return low, high


@click.command(short_help="Generate samples (ADM .npz + HDF5) from any checkpoint, on any number of GPUs.")
@click.option("--ckpt", required=True, type=click.Path(dir_okay=False),
              help="A reglue checkpoint, or an official REGLUE/REG/REPA .pt file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--n", "--num-samples", "n", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Number of samples (under torchrun write --num-samples: torchrun mistakes --n for its own options).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="Euler-Maruyama SDE (the reference), or the Euler / Heun ODE on the same time grid "
                   "[default: the checkpoint's sampling.sampler, sde for every preset].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Integration steps [default: the checkpoint's sampling.steps, 250 for the paper presets].")
@click.option("--cfg", type=click.FloatRange(min=0), default=None,
              help="Classifier-free guidance scale: d_u + S (d_c - d_u); 1: none, 0: the unconditional model "
                   "[default: the checkpoint's sampling.cfg_scale: 1, or 2.8 for sit-xl2-reglue].")
@click.option("--cls-cfg", type=click.FloatRange(min=0), default=None,
              help="[CLS] guidance scale [default: --cfg when given, else the checkpoint's sampling.cfg_cls_scale]. "
                   "The official generate.py differs: see docs/sample.md.")
@click.option("--interval", default=None, metavar="LOW,HIGH",
              help="Guidance acts only for t in [LOW, HIGH] (t = 1 is noise); one conditional pass elsewhere "
                   "[default: the checkpoint's sampling.guidance_interval, 0,0.9].")
@click.option("--cfg-channels", type=click.Choice(["all", "latents"]), default=None,
              help="Guide every channel (REGLUE) or only the 4 VAE channels [default: the checkpoint's, all].")
@click.option("--reference-vae-cfg", is_flag=True,
              help="With --cfg-channels latents and --sampler sde: the official --vae_cfg true, d_c + S (d_c - d_u) "
                   "on the latents (scale S + 1), standard CFG on every channel at the last step.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Global seed; sample i's noise and label depend only on (seed, i).")
@click.option("--chunk", type=click.IntRange(min=1), default=DEFAULT_CHUNK, show_default=True,
              help="Samples per model and decoder call (2x rows while guided). Part of the settings, like --seed: "
                   "a kernel may pick its algorithm by batch size, so a different chunk may move the last bits.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Samples per process and pass, rounded up to whole chunks: how often finished samples are saved. "
                   "Never changes a pixel.")
@click.option("--balanced", is_flag=True, help="Exactly N/K samples of each class, in a seeded random order.")
@click.option("--class", "classes", type=click.IntRange(min=0), multiple=True,
              help="Only these class ids (repeatable).")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True)
@click.option("--vae", default=None, metavar="ID|PATH|tiny",
              help="VAE decoder [default: the checkpoint's config: stabilityai/sd-vae-ft-ema, or its local copy "
                   "$REGLUE_VAE_DECODER].")
@click.option("--grid", type=click.Path(dir_okay=False), help="Also write a PNG grid of the first 64 samples.")
@click.option("--overwrite", is_flag=True, help="Replace samples of another run in --out.")
@click.option("--device", default=None, callback=check_device, help="cpu, cuda ... [default: cuda when available]")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sample(ckpt, out, n, sampler, steps, cfg, cls_cfg, interval, cfg_channels, reference_vae_cfg, seed, chunk,
           batch_size, balanced, classes, weights, vae, grid, overwrite, device, quiet) -> None:
    """Sample N images from CKPT into OUT/samples.h5 and OUT/samples.npz (arr_0: uint8 N x H x W x 3).

    \b
    Sampler, steps and guidance default to the checkpoint's `sampling` section (its preset's, see
    docs/presets.md): for the paper presets the reference's 250-step Euler-Maruyama SDE from t = 1 to 0.04
    plus a last deterministic step; EMA weights, sd-vae-ft-ema decoder, uniform random labels; the
    interpolant path (linear/cosine) and the null class come from the checkpoint too. samples.h5 records
    the settings used. The paper's guided numbers:
    --cfg 2.3 --cls-cfg 2.3 --interval 0,0.9 (the reference's script); its CFG table used 2.8. Porting an
    official generate.py command: docs/sample.md maps every flag. Run the same command again to resume;
    any --batch-size and any number of GPUs give the same images:
      torchrun --nproc_per_node 8 -m reglue_cli sample --ckpt runs/b2/checkpoints/0400000.pt \\
          --out samples/b2 --num-samples 50000
    """
    for flag, value in (("--cfg", cfg), ("--cls-cfg", cls_cfg)):
        if value is not None and not math.isfinite(value):
            fail(f"{flag} {value}: a guidance scale must be a finite number")
    low_high = parse_interval(interval) if interval is not None else None
    if reference_vae_cfg and cfg_channels != "latents":
        fail("--reference-vae-cfg only applies with --cfg-channels latents")
    request = SampleRequest(n=n, sampler=sampler, steps=steps, cfg=cfg, cls_cfg=cls_cfg, interval=low_high,
                            channels=cfg_channels, reference_vae_cfg=reference_vae_cfg, seed=seed, balanced=balanced,
                            classes=tuple(classes) or None, weights=weights, vae=vae, chunk=chunk)
    if reference_vae_cfg and sampler not in (None, "sde"):
        fail("--reference-vae-cfg reproduces the reference's SDE sampler; use it with --sampler sde")
    dist = init_distributed(device)
    try:
        summary = sample_to_dir(ckpt, out, request, batch_size, dist, overwrite, progress=not quiet)
    finally:
        shutdown()
    if dist.is_main:
        if grid:
            write_grid(summary.out, Path(grid))
        verb = "already complete" if summary.reused else f"wrote {summary.written:,} samples on this process"
        click.echo(f"{verb}: {summary.n:,} samples in {summary.out}/samples.npz ({summary.seconds:.1f} s)")
