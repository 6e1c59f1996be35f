"""`reglue probe`: how a checkpoint's hidden states align with the VFM, block by block and noise level by noise
level (CKNNA, CKA, spatial CKA, k-NN accuracy), as JSON and a heatmap."""

from __future__ import annotations

import click
import torch

from reglue.probe.run import DEFAULT_T, ProbeSettings, default_path, probe_checkpoint, write
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

INPUTS = OptionGroup("Inputs", [
    option("--data", required=True, type=click.Path(exists=True),
           help="The encoded dataset (reglue encode) whose seeded subset is probed."),
    option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
           help="The checkpoint's EMA weights or its raw model weights."),
    option("--vfm-weights", type=click.Path(dir_okay=False), help="A local VFM weights file (as `reglue train`)."),
    option("--compressor", type=click.Path(), help="The semantic compressor, when the checkpoint's recorded path "
                                                   "does not exist here (REGLUE models)."),
])

PROBE = OptionGroup("Probe", [
    option("--n", type=click.IntRange(min=2), default=1024, show_default=True,
           help="Images of the seeded subset (the same subset for every checkpoint)."),
    option("--t", "t_spec", default=",".join(f"{t:g}" for t in DEFAULT_T), show_default=True, metavar="T,T,...",
           help="Noise levels, t = 1 is noise."),
    option("--layers", default="all", show_default=True, metavar="all|L,L,...",
           help="Blocks to probe, counted from 1 (the projector's depth convention)."),
    option("--seed", type=click.IntRange(min=0, max=2**31 - 1), default=0, show_default=True,
           help="Seed of the subset and of the noise."),
    option("--topk", type=click.IntRange(min=1),
           help="CKNNA's mutual nearest neighbours [default: REPA's 10, or N - 2 below 12 images]."),
    option("--knn-k", type=click.IntRange(min=1),
           help="Neighbours of the k-NN classification [default: 20, or N - 2 below 22 images]."),
])

OUTPUT = OptionGroup("Output", [
    option("--out", type=click.Path(dir_okay=False),
           help="The JSON to write, its heatmap beside it (.png) [default: RUN/probe/STEP.json for a run's "
                "checkpoint, else CKPT.probe.json]."),
])

RUN_OPTIONS = OptionGroup(RUN, [
    option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
           help="Images per model call. Never changes a number."),
    DEVICE_OPTION,
    QUIET_OPTION,
])


def parse_t(text: str) -> tuple[float, ...]:
    """'0.25,0.5,0.75' -> noise levels in [0, 1], each once."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        fail(f"--t {text!r}: expected comma-separated noise levels in [0, 1]")
    if not all(0 <= v <= 1 for v in values):
        fail(f"--t {text}: noise levels lie in [0, 1] (t = 1 is noise)")
    return tuple(dict.fromkeys(values))


def parse_layers(text: str) -> tuple[int, ...] | None:
    """'all' -> None, '1,4,8' -> blocks counted from 1."""
    if text == "all":
        return None
    try:
        layers = tuple(dict.fromkeys(int(v) for v in text.split(",")))
    except ValueError:
        fail(f"--layers {text!r}: expected all or comma-separated block numbers counted from 1")
    if min(layers) < 1:
        fail(f"--layers {text}: blocks are counted from 1")
    return layers


def neighbours(n: int, topk: int | None = None, knn_k: int | None = None) -> dict:
    """CKNNA's topk and k-NN's k for N images: as given, else 10 and 20, at most N - 2."""
    return {"topk": topk or min(10, n - 2), "knn_k": knn_k or min(20, n - 2)}


@click.command(cls=SectionedCommand, short_help="Alignment of a checkpoint's hidden states with the VFM, by block.")
@click.argument("ckpt", type=click.Path(dir_okay=False))
@with_options(INPUTS, PROBE, OUTPUT, RUN_OPTIONS)
def probe(ckpt, data, weights, vfm_weights, compressor, n, t_spec, layers, seed, topk, knn_k, out, batch_size, device,
          quiet) -> None:
    """Probe CKPT: a seeded subset of DATA noised at each --t, every block's hidden states against the VFM's
    features of the same images. Writes a JSON ([layer][t] per metric) and a heatmap (docs/probe.md).

    \b
    cknna, cka     the block's mean-pooled tokens vs the VFM's [CLS] (REPA's CKNNA, topk 10)
    spatial_cka    the block's patch tokens vs the VFM's patch tokens, within each image
    knn_accuracy   k-NN classification of the mean-pooled tokens against the labels
    The same subset and noise for every checkpoint of any preset, so runs compare block by block:
      reglue probe runs/b2/checkpoints/0400000.pt --data data/imagenet256.h5 --n 1024
    """
    for flag, value in (("--topk", topk), ("--knn-k", knn_k)):
        if value is not None and value > n - 2:
            fail(f"{flag} {value}: at most --n - 2 = {n - 2} neighbours")
    settings = ProbeSettings(n=n, t=parse_t(t_spec), layers=parse_layers(layers), seed=seed, batch_size=batch_size,
                             **neighbours(n, topk, knn_k))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = probe_checkpoint(ckpt, data, settings, device, weights, vfm_weights, compressor, progress=not quiet)
    paths = write(result, out or default_path(ckpt))
    best = max(range(len(result["layers"])), key=lambda i: max(result["metrics"]["cknna"][i]))
    click.echo(f"CKNNA peaks at block {result['layers'][best]} ({max(result['metrics']['cknna'][best]):.3f}); "
               f"VFM [CLS] k-NN accuracy {result['vfm_knn_accuracy']:.3f}")
    click.echo("wrote " + ", ".join(map(str, paths)) + ("" if len(paths) > 1 else " (no heatmap: pip install "
                                                                                 "'reglue[plot]')"))
