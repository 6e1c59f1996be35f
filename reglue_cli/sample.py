"""`reglue sample`: N images from a checkpoint as samples.h5 + the ADM samples.npz."""

from __future__ import annotations

from pathlib import Path

import click

from reglue.distributed import init_distributed, shutdown
from reglue.sampling.grid import write_grid
from reglue.sampling.run import sample_to_dir
from reglue_cli.help_sections import (
    DEVICE_OPTION,
    QUIET_OPTION,
    RUN,
    OptionGroup,
    SectionedCommand,
    option,
    with_options,
)
from reglue_cli.sampling_options import DRAWS, GUIDANCE_CHANNELS, GUIDANCE_SCALES, SAMPLER, SELECTION, make_request

INPUTS = OptionGroup("Inputs", [
    option("--ckpt", required=True, type=click.Path(dir_okay=False),
           help="A reglue checkpoint, or an official REGLUE/REG/REPA .pt file."),
    option("--n", "--num-samples", "n", type=click.IntRange(min=1), default=50_000, show_default=True,
           help="Number of samples (under torchrun write --num-samples: torchrun mistakes --n for its own "
                "options)."),
])

OUTPUT = OptionGroup("Output", [
    option("--out", required=True, type=click.Path(file_okay=False), help="Output directory."),
    option("--grid", type=click.Path(dir_okay=False), help="Also write a PNG grid of the first 64 samples."),
    option("--overwrite", is_flag=True, help="Replace samples of another run in --out."),
])

RUN_OPTIONS = OptionGroup(RUN, [
    option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
           help="Samples per process and pass, rounded up to whole chunks: how often finished samples are saved. "
                "Never changes a pixel."),
    DEVICE_OPTION,
    QUIET_OPTION,
])


@click.command(cls=SectionedCommand,
               short_help="Generate samples (ADM .npz + HDF5) from any checkpoint, on any number of GPUs.")
@with_options(INPUTS, SAMPLER, DRAWS, SELECTION, GUIDANCE_SCALES, GUIDANCE_CHANNELS, OUTPUT, RUN_OPTIONS)
def sample(ckpt, out, n, sampler, steps, rtol, atol, time_shift, cfg, cls_cfg, interval, guide_ckpt, guide_weights,
           cfg_channels, reference_vae_cfg, seed, chunk, batch_size, balanced, classes, weights, tf32, vae, grid,
           overwrite, device, quiet) -> None:
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
    request = make_request(n, sampler, steps, cfg, cls_cfg, interval, cfg_channels, reference_vae_cfg, seed, chunk,
                           balanced, classes, weights, vae, tf32, time_shift, guide_ckpt, guide_weights, rtol, atol)
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
