"""`reglue encode`: images (folder or .tar) -> ADM crop -> SD-VAE posterior moments -> HDF5."""

from __future__ import annotations

import os

import click

from reglue.data.encode import MOMENTS_DTYPES, EncodeOptions, check_output_dir, encode_dataset
from reglue.data.sources import open_source
from reglue.distributed import from_main, init_distributed, shutdown
from reglue.encoders.vae import DEFAULT_VAE, VAE_ENV, load_vae
from reglue_cli.errors import check_device, fail
from reglue_cli.help_sections import RUN, OptionGroup, SectionedCommand, option, with_options


def _summary_line(summary, source_size: int) -> str:
    if summary.reused:
        return f"already complete: {summary.written:,} images in {', '.join(map(str, summary.outputs))}"
    rate = (source_size / summary.seconds) if summary.seconds else 0.0
    return (f"wrote {summary.written:,} images, skipped {summary.skipped_total}, "
            f"{summary.seconds:.1f} s ({rate:.1f} img/s), {summary.bytes / 2**20:,.1f} MiB -> "
            f"{', '.join(map(str, summary.outputs))}")


INPUTS = OptionGroup("Inputs", [
    option("--labels", "labels_file", type=click.Path(dir_okay=False),
           help="Labels file (JSON path->label or 'path label' lines) instead of class sub-folders."),
    option("--resolution", type=click.IntRange(min=8), default=256, show_default=True,
           help="ADM centre-crop size: 256 or 512 for ImageNet; a multiple of 8 (64 for the tiny presets)."),
])

ENCODER = OptionGroup("Encoder", [
    option("--vae", default=None, metavar="ID|PATH|tiny",
           help=f"VAE encoder: hub id, local diffusers folder, or 'tiny' (random stand-in for tests). "
                f"[default: ${VAE_ENV} or {DEFAULT_VAE}]"),
    option("--flip", is_flag=True, help="Also store the moments of the horizontally flipped image."),
    option("--moments-dtype", type=click.Choice(MOMENTS_DTYPES), default="float32", show_default=True,
           help="How the posterior mean and std are stored (float16 halves their size)."),
])

OUTPUT = OptionGroup("Output", [
    option("--out", required=True, type=click.Path(dir_okay=False), help="Output file, e.g. data.h5."),
    option("--shard-size", type=click.IntRange(min=1), default=None,
           help="Write data-00000.h5, data-00001.h5 ... holding this many source images each."),
    option("--overwrite", is_flag=True, help="Replace an output made from another source or with other options."),
])

RUN_OPTIONS = OptionGroup(RUN, [
    option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per VAE pass."),
    option("--workers", type=click.IntRange(min=0), default=min(4, os.cpu_count() or 1),
           show_default="4 or the CPU count if fewer", help="Decoding processes per GPU."),
    option("--device", default=None, callback=check_device,
           help="cpu, cuda, cuda:1 ... [default: cuda when available]"),
    option("--quiet", is_flag=True, help="No progress bar."),
])


@click.command(cls=SectionedCommand,
               short_help="Images (folder or .tar) to a training-ready HDF5 dataset of VAE moments.")
@click.argument("source", type=click.Path(exists=False))
@with_options(INPUTS, ENCODER, OUTPUT, RUN_OPTIONS)
def encode(source, out, labels_file, resolution, vae, flip, moments_dtype, batch_size, workers, shard_size,
           overwrite, device, quiet) -> None:
    """Encode SOURCE (an ImageNet-style folder, one sub-folder per class, a .tar of one, or ImageNet's
    ILSVRC2012_img_train.tar of per-class tars, read in place) into --out.

    \b
    Each image is ADM centre-cropped, its SD-VAE posterior mean and std (8 x H/8 x W/8) computed, and
    image, moments and label stored in HDF5. Undecodable files are skipped with a warning and counted.
    An interrupted run resumes when the same command is run again. On several GPUs:
      torchrun --nproc_per_node 8 -m reglue_cli encode imagenet/train --out data.h5
    Example (tests, demo):
      reglue encode images/ --out data.h5 --resolution 256 --vae tiny
    """
    if resolution % 8:
        fail(f"--resolution {resolution}: must be a multiple of 8 (the VAE downsamples by 8)")
    options = EncodeOptions(resolution=resolution, flip=flip, moments_dtype=moments_dtype,
                            batch_size=batch_size, workers=workers, shard_size=shard_size, overwrite=overwrite)
    dist = init_distributed(device)
    try:  # a bad source, VAE or output is a UserError: one line, exit 2 (reglue_cli.main)
        # rank 0 indexes the source (1.28M stat calls or tar headers for ImageNet) and sends it to the others
        images = from_main(lambda: open_source(source, labels_file), dist)
        check_output_dir(out)
        model, info = load_vae(vae)
        summary = encode_dataset(images, out, model.to(dist.device), info, options, dist=dist, progress=not quiet)
    finally:
        shutdown()
    if dist.is_main:
        if not info["comparable"]:
            click.echo(f"note: VAE {info['id']!r} is a stand-in; this dataset is not comparable to papers")
        click.echo(_summary_line(summary, len(images)))
