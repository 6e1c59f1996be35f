"""`reglue sweep`: a grid of guidance settings of one checkpoint, generated and scored in process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from evaluation.evaluate import EvalOptions
from evaluation.extract import FEATURE_CHUNK
from reglue.distributed import init_distributed, shutdown
from reglue.ema.reconstruct import MAX_RESIDUAL
from reglue.ema.source import PostHocSource
from reglue.fileio import atomic_write_text
from reglue.locks import directory_lock
from reglue.sampling.seeds import SampleError, check_repeats
from reglue.scoring.sweep import (  # for --many-points' help
    EMA_CACHE,
    HARD_MAX_POINTS,
    MAX_POINTS,
    SweepError,
    best,
    exact,
    format_table,
    grid,
    parse_steps,
    parse_values,
    plan_sweep,
    plot,
    run_plan,
)
from reglue.tracking import WandbTracker, check_wandb
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
from reglue_cli.sampling_options import (
    DRAWS,
    GUIDANCE,
    GUIDANCE_CHANNELS,
    SAMPLER,
    SELECTION,
    make_request,
    parse_interval,
)

# the table's file, OUT/sweep.EXT: never OUT/sweep.json, which is the sweep's manifest (reglue.scoring.sweep.MANIFEST)
FORMATS = {"table": "txt", "markdown": "md", "csv": "csv", "json": "table.json"}


INPUTS = OptionGroup("Inputs", [
    option("--ckpt", required=True, type=click.Path(),
           help="The checkpoint to sample; with --ema, the training run directory whose ema/ snapshots to use."),
    option("--ref", default=None, metavar="NAME|PATH",
           help="Reference batch [default: the ImageNet batch at the samples' resolution]."),
    option("--n", "--num-samples", "n", type=click.IntRange(min=2), default=10_000, show_default=True,
           help="Samples per point (and per repeat)."),
    option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
           help="Disjoint seed sets per point (--seed, --seed + 1, ...): mean and std of every metric."),
])

GRID = OptionGroup(GUIDANCE, [  # the scales and intervals are the grid's own; the channels come from GUIDANCE_CHANNELS
    option("--cfg", "cfg_spec", required=True, metavar="START:STOP:STEP|LIST",
           help="CFG scales: an inclusive range (1.5:3.0:0.25), a comma list (1.5,2.3,2.8) or one value."),
    option("--cls-cfg", "cls_spec", metavar="START:STOP:STEP|LIST",
           help="[CLS] guidance scales, crossed with --cfg [default: each point's --cfg]."),
    option("--interval", "intervals", multiple=True, metavar="LOW,HIGH",
           help="Guidance intervals, crossed with the scales (repeatable) [default: the checkpoint's]."),
    option("--guide-ckpt", "guide_spec", metavar="PATH|STEP,...",
           help="Autoguidance guides crossed with the scales (docs/sample.md): checkpoint files or steps of CKPT's "
                "run directory, e.g. 20000,50000; --cfg is then the autoguidance weight."),
    option("--guide-weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
           help="The guides' EMA or raw weights."),
    option("--many-points", is_flag=True,
           help=f"Allow more than {MAX_POINTS} points (--cfg x --cls-cfg x --interval; never more than "
                f"{HARD_MAX_POINTS:,})."),
])

EMA = OptionGroup("Post-hoc EMA", [
    option("--ema", "ema_spec", metavar="START:STOP:STEP|LIST",
           help="EMA lengths (sigma_rel) rebuilt from --ckpt's snapshots, crossed with the guidance grid "
                "(reglue ema --list shows the range they support)."),
    option("--ema-step", type=click.IntRange(min=1), help="The step of the EMAs [default: the last snapshot's]."),
    option("--max-residual", type=click.FloatRange(min=0), default=MAX_RESIDUAL, show_default=True,
           help="Refuse an EMA length whose profile the snapshots reproduce only to a larger relative error."),
])

# the sampler flags of `sample`, with --steps taking a list here: a steps axis (FID against NFE)
SWEEP_SAMPLER = OptionGroup(SAMPLER.title, [o for o in SAMPLER if o[0][0] != "--steps"] + [
    option("--steps", "steps_spec", metavar="N|N,N,...",
           help="Integration steps; several (8,16,32,64,250) make a steps axis: FID against the number of model "
                "evaluations, same seeds [default: the checkpoint's sampling.steps]."),
])

EVALUATOR = OptionGroup("Evaluator", [
    option("--inception-weights", type=click.Path(dir_okay=False),
           help="torch-fidelity's InceptionV3 weights [default: $REGLUE_INCEPTION_WEIGHTS or download]."),
    option("--feature-chunk", type=click.IntRange(min=1), default=FEATURE_CHUNK, show_default=True,
           help="Images per Inception call (zero-padded), as `reglue eval`."),
])

OUTPUT = OptionGroup("Output", [
    option("--out", required=True, type=click.Path(file_okay=False),
           help="Sweep directory: points/*.json, sweep.json, the table and sweep.png. Run again to resume."),
    option("--format", "fmt", type=click.Choice(list(FORMATS)), default="table", show_default=True,
           help="The table printed and written to OUT/sweep.{txt,md,csv,table.json}."),
    option("--new-set", is_flag=True,
           help="--out holds a sweep with other settings: start a new set beside its points (kept, never mixed "
                "in)."),
    option("--overwrite", is_flag=True, help="Discard every point in --out and start afresh."),
    option("--wandb", "wandb_project", metavar="PROJECT",
           help="Also log every point to Weights & Biases (pip install 'reglue[wandb]'; WANDB_MODE=offline "
                "honoured)."),
])

RUN_OPTIONS = OptionGroup(RUN, [
    option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
           help="Images generated and read per pass. Never changes a number."),
    DEVICE_OPTION,
    QUIET_OPTION,
])


@click.command(cls=SectionedCommand,
               short_help="Score a grid of CFG scales and intervals of one checkpoint (FID, IS, ... per point).")
@with_options(INPUTS, GRID, GUIDANCE_CHANNELS, SWEEP_SAMPLER, DRAWS, SELECTION, EMA, EVALUATOR, OUTPUT, RUN_OPTIONS)
def sweep(ckpt, cfg_spec, cls_spec, intervals, guide_spec, guide_weights, ema_spec, ema_step, max_residual, steps_spec,
          n, ref, out, repeats, fmt, inception_weights, batch_size, feature_chunk, wandb_project, new_set, overwrite,
          many_points, device, quiet, **sampling) -> None:
    """Generate and score CKPT at every combination of --cfg, --cls-cfg and --interval, all with the same seeds
    (common random numbers: the differences between points are not seed noise).

    \b
    Prints the table with the best FID marked, writes it to OUT/sweep.<format> and plots FID and IS against the
    scale per interval to OUT/sweep.png. Interrupted sweeps resume point by point (run the same command again);
    other settings into the same OUT are refused, naming them, unless --new-set (docs/scoring.md).
      reglue sweep --ckpt runs/b2/checkpoints/0400000.pt --cfg 1.5:3.0:0.25 --interval 0,0.7 --interval 0,0.9 \\
          --n 10000 --ref imagenet256 --out sweeps/b2
    With --ema, CKPT is a run directory trained with EMA snapshots and every point also has an EMA length
    (post-hoc EMA, docs/ema.md): the best EMA and guidance together, the plot FID against sigma_rel per scale:
      reglue sweep --ckpt runs/b2 --ema 0.04:0.16:0.02 --cfg 1.5:3.0:0.25 --n 10000 --out sweeps/b2-ema
    Under torchrun every point is generated on all GPUs.
    """

    try:  # the grammar, the grid's size and the seed range: before anything is loaded
        emas = parse_values(ema_spec, "--ema") if ema_spec else None
        steps = parse_steps(steps_spec) if steps_spec else None
        points = grid(parse_values(cfg_spec, "--cfg"), parse_values(cls_spec, "--cls-cfg") if cls_spec else None,
                      [parse_interval(i) for i in intervals] or [None], many_points, emas,
                      steps if steps and len(steps) > 1 else None, guide_spec.split(",") if guide_spec else None)
        check_repeats(sampling["seed"], repeats)
    except (SweepError, SampleError) as exc:
        fail(str(exc))
    if Path(ckpt).is_dir() != bool(emas):
        fail(f"--ckpt {ckpt}: a run directory goes with --ema (post-hoc EMA lengths), a checkpoint file without it")
    if (ema_step is not None) and not emas:
        fail("--ema-step goes with --ema")
    if wandb_project:

        check_wandb(wandb_project, Path(out))  # the package, the project name, a stored run id: nothing opened
    if guide_spec is None and guide_weights != "ema":
        fail("--guide-weights goes with --guide-ckpt")
    base = dataclasses.replace(make_request(n, steps=steps[0] if steps and len(steps) == 1 else None, **sampling),
                               guide_weights=guide_weights)  # the guides themselves are the grid's
    dist = init_distributed(device)
    options = EvalOptions(batch_size=batch_size, device=str(dist.device), progress=not quiet,
                          feature_chunk=feature_chunk)
    lock = directory_lock(Path(out)).acquire() if dist.is_main else None
    tracker = None
    try:
        source = PostHocSource.open(ckpt, emas, ema_step, max_residual, Path(out) / EMA_CACHE) if emas else None
        plan = plan_sweep(ckpt, base, points, out, ref, inception_weights, options, repeats, overwrite, new_set,
                          source)
        tracker = _tracker(wandb_project, out, base) if wandb_project and dist.is_main else None  # checks passed
        rows = run_plan(plan, dist, on_point=lambda p, r: _progress(p, r, tracker, quiet),
                        log=lambda line: click.echo(line, err=True))
        if tracker is not None:
            tracker.log_table(rows, best(rows))
    finally:
        if lock is not None:
            lock.release()
        if tracker is not None:
            tracker.finish()
        shutdown()
    if not dist.is_main:
        return
    text = format_table(rows, fmt)
    atomic_write_text(Path(out) / f"sweep.{FORMATS[fmt]}", text + "\n")
    click.echo(text)
    top = best(rows)
    where = (f"ema {exact(top['ema'])}, " if "ema" in top else "") + (f"{top['steps']} steps (NFE {top['nfe']}), "
                                                                     if "steps" in top else "")
    click.echo(f"best: FID {top['fid']:.4f} at {where}cfg {exact(top['cfg'])}, [CLS] {exact(top['cls_cfg'])}, "
               f"interval {top['interval']}")
    try:
        click.echo(f"plot: {plot(rows, Path(out) / 'sweep.png')}")
    except ImportError:
        click.echo("no plot: pip install 'reglue[plot]' (matplotlib), then run the same command again", err=True)


def _progress(point, result, tracker, quiet) -> None:
    if not quiet:
        click.echo(f"{point.label}: FID {result['fid']:.4f}  IS {result['inception_score']:.2f}", err=True)
    if tracker is not None:
        tracker.log_point(point, result)


def _tracker(project, out, base):

    return WandbTracker(project, name=Path(out).name, config={"kind": "sweep", "n": base.n, "seed": base.seed},
                        directory=Path(out))
