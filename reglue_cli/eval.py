"""`reglue eval`: the ADM evaluator's FID, sFID, IS, precision and recall, in PyTorch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from evaluation.evaluate import EvalOptions, evaluate
from evaluation.families import FAMILIES
from evaluation.fid import FID_BACKENDS
from evaluation.inception import is_published_weights
from evaluation.precision_recall import PR_PRECISIONS
from reglue.distributed import init_distributed, shutdown
from reglue.fileio import atomic_write_text
from reglue.sampling.seeds import check_repeats
from reglue.sampling.store import OtherRunError
from reglue.scoring.generate_and_score import score_checkpoint, score_saved
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
from reglue_cli.make_ref import INCEPTION, build_reference
from reglue_cli.sampling_options import DRAWS, GUIDANCE_CHANNELS, GUIDANCE_SCALES, SAMPLER, SELECTION, make_request

DEPRECATED_MAKE_REF = ("note: `reglue eval --make-ref` is deprecated: use `reglue make-ref SOURCE --out REF.npz` "
                       "(the same options and output)")
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


INPUTS = OptionGroup("Inputs", [
    option("--ref", default=None, metavar="NAME|PATH",
           help="Reference batch: a name from reference_stats/registry.yaml or an ADM .npz (`reglue make-ref` builds "
                "one) [default: the ImageNet batch at the samples' resolution: imagenet256, or imagenet512 for 512 "
                "px samples]."),
    option("--ckpt", type=click.Path(dir_okay=False),
           help="Instead of SAMPLES: generate from this checkpoint and score in one process (nothing written)."),
    option("--n", "--num-samples", "n", type=click.IntRange(min=2), default=50_000, show_default=True,
           help="With --ckpt: how many samples to generate and score."),
    option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
           help="With --ckpt: score K disjoint seed sets (--seed, --seed + 1, ...) and report mean and std."),
])

EVALUATOR = OptionGroup("Evaluator", [
    option("--pr-precision", type=click.Choice(PR_PRECISIONS), default="fp16", show_default=True,
           help="Distances for precision/recall: fp16 as ADM, or fp32."),
    option("--fid-backend", type=click.Choice(FID_BACKENDS), default="eigh", show_default=True,
           help="Trace term: symmetric eigendecompositions (fast, float64), or ADM's scipy sqrtm (audit)."),
    option("--metrics", "families", default="", metavar="FAMILIES",
           help="Extra families beside ADM's, reported apart: clean_fid, kid, fd_dinov2 (comma-separated)."),
    option("--dinov2-weights", type=click.Path(dir_okay=False),
           help="DINOv2-L/14 weights for fd_dinov2 [default: $REGLUE_DINOV2_WEIGHTS or timm's download]."),
])

OUTPUT = OptionGroup("Output", [
    option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the metrics and provenance here."),
    option("--features", type=click.Path(dir_okay=False), help="Also store pool, spatial and logits features (HDF5)."),
    option("--save-samples", type=click.Path(file_okay=False),
           help="With --ckpt: also keep the images, as `reglue sample --out DIR` writes them (resumable)."),
])

RUN_OPTIONS = OptionGroup(RUN, [
    option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
           help="Images read (and, with --ckpt, generated) per pass. Never changes a feature."),
    DEVICE_OPTION,
    QUIET_OPTION,
])


@click.command("eval", cls=SectionedCommand,
               short_help="FID, sFID, IS, precision and recall with the ADM evaluator's semantics, in PyTorch.")
@click.argument("samples", type=click.Path(), required=False)
@with_options(INPUTS, SAMPLER, DRAWS, SELECTION, GUIDANCE_SCALES, GUIDANCE_CHANNELS, INCEPTION, EVALUATOR, OUTPUT,
              RUN_OPTIONS)
# `eval --make-ref` before `reglue make-ref` existed: still accepted, hidden from --help, with a note (docs/eval.md)
@click.option("--make-ref", type=click.Path(), hidden=True)
@click.option("--out", type=click.Path(dir_okay=False), hidden=True)
@click.option("--resolution", type=click.IntRange(min=8), default=256, hidden=True)
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
    A reference for another dataset or resolution: `reglue make-ref` (its --help).
    """
    if make_ref:
        click.echo(DEPRECATED_MAKE_REF, err=True)
        if not out:
            fail("--make-ref needs --out REF.npz")
        build_reference(make_ref, out, resolution, inception_weights, batch_size, feature_chunk, device, quiet)
        return
    if samples is not None and ckpt:
        fail("give SAMPLES or --ckpt, not both")
    if samples is None and not ckpt:
        fail("Missing argument 'SAMPLES' (or --ckpt CKPT to generate and score; `reglue make-ref` builds a "
             "reference batch)")
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
