"""`reglue make-ref`: a reference batch in ADM's format (Inception statistics + 10k images) for any image set."""

from __future__ import annotations

from pathlib import Path

import click

from evaluation.errors import InputError
from evaluation.extract import FEATURE_CHUNK
from evaluation.images import H5Images
from evaluation.inception import InceptionFeatures
from evaluation.reference import make_reference
from reglue.data.crop import crop_or_reason
from reglue.data.sources import open_source
from reglue_cli.errors import fail
from reglue_cli.help_sections import (
    DEVICE_OPTION,
    QUIET_OPTION,
    RUN,
    OptionGroup,
    SectionedCommand,
    option,
    with_options,
)

ENCODED_SUFFIXES = (".h5", ".hdf5")  # an encoded dataset (or samples.h5): its images are used as stored

# The Inception network's options, shared with `reglue eval` (a reference is scored with the weights it was built with)
INCEPTION = OptionGroup("Evaluator", [
    option("--inception-weights", type=click.Path(dir_okay=False),
           help="torch-fidelity's InceptionV3 weights file, or 'random' for a seeded stand-in (tests, demo) "
                "[default: $REGLUE_INCEPTION_WEIGHTS or download]."),
    option("--feature-chunk", type=click.IntRange(min=1), default=FEATURE_CHUNK, show_default=True,
           help="Images per Inception call, zero-padded to full size: like the sampler's --chunk, part of the "
                "settings (the same on any --batch-size and GPU count; another chunk may move the last bits)."),
])

IMAGES = OptionGroup("Inputs", [
    option("--resolution", type=click.IntRange(min=8), default=256, show_default=True,
           help="With an image folder: the ADM centre-crop size, the side of the samples to be scored (an encoded "
                "dataset's images are used at their stored size)."),
])

OUTPUT = OptionGroup("Output", [
    option("--out", required=True, type=click.Path(dir_okay=False), metavar="REF.npz",
           help="The reference batch to write (written whole or not at all; an existing file is replaced)."),
])

RUN_OPTIONS = OptionGroup(RUN, [
    option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
           help="Images read per pass. Never changes a feature."),
    DEVICE_OPTION,
    QUIET_OPTION,
])


@click.command("make-ref", cls=SectionedCommand,
               short_help="A reference batch (ADM .npz) for scoring against another dataset or resolution.")
@click.argument("source", type=click.Path(), metavar="IMAGES_OR_H5")
@with_options(IMAGES, INCEPTION, OUTPUT, RUN_OPTIONS)
def make_ref(source, resolution, inception_weights, feature_chunk, out, batch_size, device, quiet) -> None:
    """Build a reference batch from IMAGES_OR_H5 (an image folder, a .tar of one, or an encoded data.h5) into --out.

    \b
    A reference batch is what `reglue eval --ref` scores samples against, in the format of ADM's
    VIRTUAL_imagenet256_labeled.npz: the Inception statistics of the real images (mu, sigma of pool_3 for
    FID; mu_s, sigma_s of mixed_6/conv for sFID) over every image, and arr_0, a seeded random subset of
    10,000 images whose features give precision and recall. ImageNet's batches (imagenet256, imagenet512,
    imagenet64) are downloaded by name; build one for any other dataset or resolution, and score against
    it with the same --inception-weights (and --feature-chunk).
    The ADM crop: each image of a folder is halved with a box filter while its short side is at least twice
    --resolution, resized bicubically to a short side of --resolution and centre-cropped to a square (the
    crop of ADM's data loader and of `reglue encode`); an image that does not decode is skipped with a note.
    An encoded dataset already holds its cropped images: they are used as they are.
      reglue make-ref /data/ffhq --resolution 256 --out ffhq256_ref.npz
      reglue make-ref data.h5 --out ref.npz --inception-weights random     (the demo's stand-in)
      reglue eval samples/ffhq/samples.npz --ref ffhq256_ref.npz
    """
    build_reference(source, out, resolution, inception_weights, batch_size, feature_chunk, device, quiet)


class CroppedFolder:
    """An image folder as an evaluation reader: each image decoded and ADM centre-cropped. An image that cannot be
    decoded is left out, with a one-line note naming it the first time (as `reglue encode` skips it); ``skipped``
    maps each such file to the reason."""

    def __init__(self, source, resolution: int, log=lambda line: click.echo(line, err=True)):
        self.source, self.resolution, self.log = source, resolution, log
        self.shape = (len(source), resolution, resolution, 3)
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.source)

    def _decode(self, reader, index: int):
        """The cropped image, or None (noted) when the file does not decode."""
        image, reason = crop_or_reason(lambda: reader.read(index), self.resolution)
        path = str(Path(self.source.root) / self.source.keys[index])
        if image is None and path not in self.skipped:
            self.skipped[path] = reason
            self.log(f"skipped {path}: {reason}")
        return image

    def batches(self, batch: int):
        """uint8 (B, H, W, 3) batches of the images that decode (fewer than ``batch`` where some did not)."""
        import numpy as np

        reader = self.source.reader()
        for start in range(0, len(self), batch):
            images = [self._decode(reader, i) for i in range(start, min(start + batch, len(self)))]
            images = [image for image in images if image is not None]
            yield np.stack(images) if images else np.zeros((0, *self.shape[1:]), np.uint8)


def build_reference(source, out, resolution, weights, batch_size, feature_chunk, device, quiet) -> None:
    """An encoded dataset's images as they are, or a folder through the ADM crop, into the reference ``out``; on
    the GPU when there is one, in fixed chunks of ``feature_chunk`` images (the same features as `reglue eval`)."""
    import torch


    if Path(source).suffix in ENCODED_SUFFIXES:  # errors of source and weights: one line (reglue_cli.main)
        images = H5Images(source)
    else:
        images = CroppedFolder(open_source(source), resolution)
    extractor = InceptionFeatures(weights, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        info = make_reference(images, extractor, out, batch_size=batch_size, progress=not quiet, chunk=feature_chunk)
    except InputError as exc:
        fail(f"{source}: {exc}")
    skipped = f" ({info['skipped']:,} undecodable image(s) skipped)" if info.get("skipped") else ""
    click.echo(f"reference batch {info['out']}: statistics over {info['n']:,} images, {info['subset']:,} kept as "
               f"arr_0{skipped}")
