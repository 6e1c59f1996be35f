"""`reglue eval`: the ADM evaluator's FID, sFID, IS, precision and recall, in PyTorch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from evaluation.errors import InputError
from evaluation.evaluate import EvalOptions, evaluate
from evaluation.extract import FEATURE_CHUNK
from evaluation.families import FAMILIES
from evaluation.fid import FID_BACKENDS
from evaluation.inception import is_published_weights
from evaluation.precision_recall import PR_PRECISIONS
from reglue.data.crop import crop_or_reason
from reglue.data.sources import open_source
from reglue.distributed import init_distributed, shutdown
from reglue.fileio import atomic_write_text
from reglue.sampling.seeds import check_repeats
from reglue.sampling.store import OtherRunError
from reglue_cli.errors import check_device, fail
from reglue_cli.sampling_options import (
    DRAWS,
    GUIDANCE_CHANNELS,
    GUIDANCE_SCALES,
    SAMPLER,
    SELECTION,
    make_request,
    with_options,
)

ROWS = (("FID", "fid", "{:.4f}"), ("sFID", "sfid", "{:.4f}"), ("Inception Score", "inception_score", "{:.2f}"),
        ("Precision", "precision", "{:.4f}"), ("Recall", "recall", "{:.4f}"))


def format_spread(spread: dict) -> str:
    """Mean +- standard deviation of every metric over the repeats."""
    lines = [f"over {len(spread['fid']['values'])} disjoint seed sets (mean +- std, ddof 1):"]
    lines += [f"{name:<16} {fmt.format(spread[key]['mean'])} +- {fmt.format(spread[key]['std'])}"
              for name, key, fmt in ROWS]
    return "\n".join(lines)


def generate_and_score(ckpt, request, ref, inception_weights, options, repeats, save_samples, dist) -> dict:
    """`eval --ckpt`: in process, or through `reglue sample`'s directory when the images are to be kept."""
    from reglue.scoring.generate_and_score import score_checkpoint, score_saved

    if save_samples:
        return score_saved(ckpt, request, save_samples, ref, inception_weights, options, repeats, dist)
    return score_checkpoint(ckpt, request, ref, inception_weights, options, repeats)


def format_table(result: dict) -> str:
    """The five numbers and what they were computed with, as a small text table."""
    lines = [f"{name:<16} {fmt.format(result[key])}" for name, key, fmt in ROWS]
    lines.append(f"{'N':<16} {result['n']:,} samples ({result['is_splits']} IS splits), reference "
                 f"{result['reference']} ({result['reference_statistics']})")
    lines.append(f"{'backends':<16} FID {result['fid_backend']}, P/R {result['pr_precision']}, Inception weights "
                 f"sha256 {result['inception_weights_sha256'][:12]}")
    if not is_published_weights(result["inception_weights_sha256"]):
        lines.append("note: not torch-fidelity's published Inception weights (a stand-in?): these numbers are not "
                     "comparable to papers")
    for family, values in result.get("families", {}).items():
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
        lines.append(f"{family + ':':<16} {numbers}   (own family: not comparable with the ADM columns; "
                     f"reference {values['reference']})")
    return "\n".join(lines)


@click.command("eval", short_help="FID, sFID, IS, precision and recall with the ADM evaluator's semantics, in PyTorch.")
@click.argument("samples", type=click.Path(), required=False)
@click.option("--ref", default=None, metavar="NAME|PATH",
              help="Reference batch: a name from reference_stats/registry.yaml or an ADM .npz [default: the ImageNet "
                   "batch at the samples' resolution: imagenet256, or imagenet512 for 512 px samples].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the metrics and provenance here.")
@click.option("--features", type=click.Path(dir_okay=False),
              help="Also store pool, spatial and logits features (HDF5).")
@click.option("--inception-weights", type=click.Path(dir_okay=False),
              help="torch-fidelity's InceptionV3 weights file, or 'random' for a seeded stand-in (tests, demo) "
                   "[default: $REGLUE_INCEPTION_WEIGHTS or download].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images read (and, with --ckpt, generated) per pass. Never changes a feature.")
@click.option("--feature-chunk", type=click.IntRange(min=1), default=FEATURE_CHUNK, show_default=True,
              help="Images per Inception call, zero-padded to full size: like the sampler's --chunk, part of the "
                   "settings (the same on any --batch-size and GPU count; another chunk may move the last bits).")
@click.option("--pr-precision", type=click.Choice(PR_PRECISIONS), default="fp16", show_default=True,
              help="Distances for precision/recall: fp16 as ADM, or fp32.")
@click.option("--fid-backend", type=click.Choice(FID_BACKENDS), default="eigh", show_default=True,
              help="Trace term: symmetric eigendecompositions (fast, float64), or ADM's scipy sqrtm (audit).")
@click.option("--make-ref", type=click.Path(), metavar="SOURCE",
              help="Instead of scoring: build an ADM-format reference batch from an image folder (ADM-cropped to "
                   "--resolution) or an encoded dataset; write it to --out.")
@click.option("--out", type=click.Path(dir_okay=False), help="With --make-ref: the reference .npz to write.")
@click.option("--resolution", type=click.IntRange(min=8), default=256, show_default=True,
              help="With --make-ref on a folder: the ADM centre-crop size.")
@click.option("--metrics", "families", default="", metavar="FAMILIES",
              help="Extra families beside ADM's, reported apart: clean_fid, kid, fd_dinov2 (comma-separated).")
@click.option("--dinov2-weights", type=click.Path(dir_okay=False),
              help="DINOv2-L/14 weights for fd_dinov2 [default: $REGLUE_DINOV2_WEIGHTS or timm's download].")
@click.option("--ckpt", type=click.Path(dir_okay=False),
              help="Instead of SAMPLES: generate from this checkpoint and score in one process (nothing written).")
@click.option("--n", "--num-samples", "n", type=click.IntRange(min=2), default=50_000, show_default=True,
              help="With --ckpt: how many samples to generate and score.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ckpt: score K disjoint seed sets (--seed, --seed + 1, ...) and report mean and std.")
@click.option("--save-samples", type=click.Path(file_okay=False),
              help="With --ckpt: also keep the images, as `reglue sample --out DIR` writes them (resumable).")
@with_options(SAMPLER, GUIDANCE_SCALES, GUIDANCE_CHANNELS, DRAWS, SELECTION)
@click.option("--device", default=None, callback=check_device, help="cpu, cuda ... [default: cuda when available]")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_(samples, ref, json_out, features, inception_weights, batch_size, feature_chunk, pr_precision, fid_backend,
          make_ref, out, resolution, families, dinov2_weights, ckpt, n, repeats, save_samples, device, quiet,
          **sampling) -> None:
    """Score SAMPLES (an ADM .npz with arr_0 uint8 N x H x W x 3, a samples.h5, or a folder of images).

    \b
    The numbers are those of OpenAI's ADM evaluator: Inception-v3 (TF weights via torch-fidelity), FID on
    pool_3, sFID on mixed_6/conv[:7], IS over consecutive splits of 5000, precision/recall with k = 3.
      reglue eval samples/b2/samples.npz --ref imagenet256 --json samples/b2/metrics.json
    Offline: --inception-weights FILE and --ref /path/VIRTUAL_imagenet256_labeled.npz.
    Generate and score in one process (the same numbers as `reglue sample` then `reglue eval`; sampler flags
    as `reglue sample`, defaulting to the checkpoint's sampling section; any GPU count under torchrun):
      reglue eval --ckpt runs/b2/checkpoints/0400000.pt --n 10000 --cfg 2.3 --json runs/b2/eval/fid10k.json
      reglue eval --ckpt CKPT --n 10000 --repeats 3     (mean and std over 3 disjoint seed sets)
    A reference for another dataset or resolution (statistics over all images, 10k kept for P/R):
      reglue eval --make-ref /data/ffhq --resolution 256 --out ffhq256_ref.npz
    """
    if make_ref:
        _make_reference(make_ref, out, resolution, inception_weights, batch_size, feature_chunk, device, quiet)
        return
    if samples is not None and ckpt:
        fail("give SAMPLES or --ckpt, not both")
    if samples is None and not ckpt:
        fail("Missing argument 'SAMPLES' (or --ckpt CKPT to generate and score, or --make-ref SOURCE --out REF.npz)")
    if not ckpt and (repeats != 1 or save_samples):
        fail("--repeats and --save-samples go with --ckpt")
    if ckpt:
        check_repeats(sampling["seed"], repeats)  # before anything is loaded: one line, exit 2
    request = make_request(n, **sampling) if ckpt else None
    dist = init_distributed(device)
    if features and dist.world > 1:
        shutdown()
        fail("--features is written by single-process runs only (for now); drop it under torchrun")
    extra = tuple(f for f in families.split(",") if f)
    unknown = sorted(set(extra) - set(FAMILIES))
    if unknown:
        shutdown()
        fail(f"--metrics: unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    for path in (features, json_out):  # e.g. runs/b2/eval/ on first use; a bad path fails before the work
        if path and dist.is_main:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    options = EvalOptions(batch_size=batch_size, device=str(dist.device), pr_precision=pr_precision,
                          fid_backend=fid_backend, features_out=features, progress=not quiet, families=extra,
                          dinov2_weights=dinov2_weights, feature_chunk=feature_chunk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # an InputError is one line and exit 2 (reglue_cli.main)
            if ckpt:
                result = generate_and_score(ckpt, request, ref, inception_weights, options, repeats, save_samples,
                                            dist)
            else:
                result = evaluate(samples, ref, inception_weights, options)
        except OtherRunError as exc:  # eval has no --overwrite: its remedy is another directory
            fail(f"--save-samples {exc.out}: holds samples of another run (checkpoint or settings differ); give "
                 "another directory, or delete this one")
        finally:
            shutdown()
    if not dist.is_main:
        return
    for w in caught:
        if issubclass(w.category, UserWarning):
            click.echo(f"warning: {w.message}", err=True)
    click.echo(format_table(result))
    if "spread" in result:
        click.echo(format_spread(result["spread"]))
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2))


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


def _make_reference(source, out, resolution, weights, batch_size, feature_chunk, device, quiet) -> None:
    """`--make-ref`: an encoded dataset's images as they are, or a folder through the ADM crop; on the GPU when there
    is one, in fixed chunks of ``feature_chunk`` images (the same features as `reglue eval` computes)."""
    import torch

    from evaluation.images import H5Images
    from evaluation.inception import InceptionFeatures
    from evaluation.reference import make_reference

    if not out:
        fail("--make-ref needs --out REF.npz")
    if Path(source).suffix in (".h5", ".hdf5"):  # errors of source and weights: one line (reglue_cli.main)
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
