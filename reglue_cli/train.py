"""`reglue train`: resolve a preset (plus overrides) and train it; `--dry-run` shows what would run."""

from __future__ import annotations

import json
import os

import click
import yaml

from evaluation.evaluate import EvalOptions
from evaluation.extract import FEATURE_CHUNK
from reglue import config as run_config
from reglue import presets
from reglue.distributed import shutdown
from reglue.ema.profiles import classic_sigma_rel
from reglue.models import count_compressor_parameters, count_parameters
from reglue.models.flops import forward_gflops
from reglue.probe.during_training import TrainingProbe
from reglue.probe.run import ProbeSettings
from reglue.scoring.during_training import TrainingEvaluator
from reglue.tracking import check_wandb
from reglue.training.compressor import train_compressor
from reglue.training.diffusion import TrainingStopped, TrainOptions, train_diffusion
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
from reglue_cli.probe import neighbours

PRECISIONS = ("fp32", "bf16", "fp16")
EVAL_FAILURE = ("continue", "stop")  # --eval-failure: train on after a failed evaluation, or checkpoint and stop

# Command-line options that are shortcuts for preset keys: option name -> key path.
OPTION_KEYS = {
    "max_steps": "train.max_steps",
    "sample_every": "train.sample_every",
    "compressor": "compressor.path",
    "global_batch": "train.global_batch",
    "precision": "train.precision",
    "seed": "train.seed",
    "ckpt_every": "train.ckpt_every",
    "log_every": "train.log_every",
}


def resolve_config(preset: str, assignments: tuple[str, ...], options: dict) -> run_config.RunConfig:
    """The typed preset with ``--set KEY=VALUE`` assignments, then the shortcut options, applied and checked."""
    overrides = presets.parse_assignments(assignments)  # a key given twice: one line
    shortcuts = {OPTION_KEYS.get(k, "vfm.name"): (k, v) for k, v in options.items() if v is not None}
    for key, (name, value) in shortcuts.items():
        if key in overrides:  # --max-steps 3 with --set train.max_steps=5: which one did the user mean?
            fail(f"--{name.replace('_', '-')} and --set {key} both given; give one of them")
    overrides.update({key: value for key, (name, value) in shortcuts.items() if name != "vfm"})
    if options.get("vfm") is not None:  # last: the swap reads the final data.resolution
        overrides["vfm.name"] = options["vfm"]
    return run_config.from_dict(presets.apply_overrides(presets.resolve(preset), overrides))


def parameter_counts(config: run_config.RunConfig) -> dict[str, int]:
    """Parameter counts of what the preset trains."""
    if config.kind == "compressor":
        return count_compressor_parameters(config)
    return count_parameters(config)


def print_dry_run(config: run_config.RunConfig, counts: dict[str, int], as_json: bool) -> None:
    """The resolved config and parameter counts, as YAML-like text or as JSON."""
    data = {k: v for k, v in run_config.to_dict(config).items() if k != "origin"}
    gflops = forward_gflops(config) if config.kind == "diffusion" else None
    if as_json:
        click.echo(json.dumps({"preset": config.preset, "config": data, "parameters": counts,
                               "gflops_forward": gflops}, indent=2))
        return
    click.echo(f"# preset {config.preset}: {config.description}")
    click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=None).rstrip())
    click.echo("# parameters")
    for name, value in counts.items():
        click.echo(f"#   {name:<18} {value:>15,}")
    if config.kind == "diffusion":
        m, v = config.model, config.vfm
        grid = m.input_size // m.patch_size
        click.echo(f"# tokens: {grid * grid} latent ({grid}x{grid} patches of the {m.input_size}x{m.input_size} "
                   f"latents){' + 1 [CLS]' if m.cls_token else ''}; VFM {v.name} at {v.image_size} px")
        click.echo(f"# forward: {gflops:.2f} GFLOPs per image (a multiply-add counted once, as the DiT paper; "
                   "the frozen VAE and VFM not included)")
        _echo_ema(config, counts["total"])


def _echo_ema(config, parameters: int) -> None:
    """The EMAs in words: the classic decay as a sigma_rel at the last step and, with post-hoc EMA, the snapshots'
    disk cost."""
    ema, steps = config.ema, config.train.max_steps
    click.echo(f"# EMA: classic decay {ema.decay:g} = sigma_rel {classic_sigma_rel(ema.decay, steps):.4f} at step "
               f"{steps:,} (docs/ema.md)")
    if ema.sigma_rels:
        each = parameters * len(ema.sigma_rels) * (2 if ema.snapshot_precision == "fp16" else 4) / 2**30
        count = -(-steps // ema.snapshot_every)
        click.echo(f"#   post-hoc: sigma_rel {', '.join(map(str, ema.sigma_rels))} tracked; a snapshot every "
                   f"{ema.snapshot_every:,} steps, about {each:.2f} GiB each, {count * each:.1f} GiB for {count} "
                   "if all are kept")


def _evaluator(config, every: int, n: int, ref: str | None, inception_weights: str | None, feature_chunk: int,
               failure: str):
    """The in-process evaluation callback of --eval-every, every setting checked against ``config`` now (before
    anything is written)."""
    evaluator = TrainingEvaluator(every=every, n=n, ref=ref, inception_weights=inception_weights,
                                  options=EvalOptions(feature_chunk=feature_chunk), failure=failure)
    evaluator.launch_identity(config)
    return evaluator


def _check_wandb(project: str, outdir: str) -> None:
    """The package, the project name and the stored run id of --wandb, before anything is built or written."""
    from pathlib import Path


    check_wandb(project, Path(outdir))


PRESET = OptionGroup("Preset", [
    option("--preset", required=True, metavar="NAME",
           help="Preset to train, e.g. sit-b2-reglue, sit-xl2-repa, compressor-dinov2-b, tiny-reglue."),
    option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
           help="Override any preset key, e.g. --set model.qk_norm=true --set loss.semantic=0.5 (repeatable)."),
    option("--max-steps", type=click.IntRange(min=1), help="Stop after this many optimiser steps."),
    option("--global-batch", type=click.IntRange(min=1), help="Images per optimiser step over all GPUs."),
    option("--precision", type=click.Choice(PRECISIONS), help="Autocast precision (fp16 adds a loss scaler)."),
    option("--seed", type=click.IntRange(min=0), help="Seed of every random draw of the run."),
    option("--ckpt-every", type=click.IntRange(min=1), help="Save a checkpoint every N steps."),
    option("--log-every", type=click.IntRange(min=1), help="Print and log the loss terms every N steps."),
    option("--sample-every", type=click.IntRange(min=0), help="Save a grid of EMA samples every N steps (0: never)."),
])

INPUTS = OptionGroup("Inputs", [
    option("--data", type=click.Path(dir_okay=False), help="Encoded dataset from `reglue encode` (data.h5)."),
    option("--compressor", type=click.Path(),
           help="Frozen semantic compressor for REGLUE presets: a compressor-* run's directory (or any of its "
                "checkpoints, or its compressor.pt), or the official file."),
    option("--vfm", metavar="NAME",
           help="Swap the preset's VFM for a registry entry (docs/models.md), e.g. dinov2-vitl14-reg or "
                "dinov3-vitb16; its input size, widths and blocks follow."),
    option("--vfm-weights", type=click.Path(dir_okay=False),
           help="Local weights file of the run's VFM (the family's own release or timm's; $REGLUE_VFM) for "
                "machines without network; for the tiny-dinov2 stand-in, a file from scripts/toy_vfm.py."),
])

OUTPUT = OptionGroup("Output", [
    option("--outdir", type=click.Path(file_okay=False), help="Run directory; run the same command again to resume."),
    option("--keep-last", type=click.IntRange(min=1), default=3, show_default=True, help="Checkpoints to keep."),
    option("--keep-every", type=click.IntRange(min=1),
           help="Also keep every checkpoint whose step is a multiple of N."),
    option("--tensorboard", is_flag=True,
           help="Also write the logged numbers to run/tensorboard (needs tensorboard)."),
    option("--wandb", "wandb_project", metavar="PROJECT",
           help="Also log to Weights & Biases (pip install 'reglue[wandb]'; WANDB_MODE=offline honoured)."),
])

PROBE = OptionGroup("Alignment probe", [
    option("--probe-every", type=click.IntRange(min=1), metavar="N",
           help="Every N steps and at the end: the alignment probe of the EMA weights (`reglue probe`) on rank 0: "
                "run/probe/STEP.json and .png, metrics.jsonl, TensorBoard/W&B (docs/probe.md)."),
    option("--probe-n", type=click.IntRange(min=3), default=1024, show_default=True,
           help="Images of the probe's seeded subset (CKNNA's topk 10 and k-NN's 20 shrink below 22 images)."),
])

EVALUATOR = OptionGroup("Evaluator", [
    option("--eval-every", type=click.IntRange(min=1), metavar="N",
           help="Every N steps and at the end: generate --eval-n samples from the EMA weights with the preset's "
                "sampling settings and score them in process (run/eval/STEP.json, metrics.jsonl, TensorBoard)."),
    option("--eval-n", type=click.IntRange(min=2), default=10_000, show_default=True,
           help="Samples per evaluation during training."),
    option("--eval-ref", metavar="NAME|PATH",
           help="Reference batch for --eval-every [default: the ImageNet batch at the run's resolution]."),
    option("--eval-failure", type=click.Choice(EVAL_FAILURE), default="continue", show_default=True,
           help="An evaluation that fails during training (reference gone, full disk ...): report it (log.txt, "
                "metrics.jsonl 'eval_error') and train on, or save a checkpoint and stop (exit 2)."),
    option("--feature-chunk", type=click.IntRange(min=1), default=FEATURE_CHUNK, show_default=True,
           help="For --eval-every: images per Inception call (zero-padded), as `reglue eval --feature-chunk`."),
    option("--inception-weights", type=click.Path(dir_okay=False),
           help="For --eval-every: torch-fidelity's InceptionV3 weights file [default: $REGLUE_INCEPTION_WEIGHTS "
                "or download]."),
])

RUN_OPTIONS = OptionGroup(RUN, [
    option("--batch-gpu", type=click.IntRange(min=1),
           help="Samples per GPU per forward pass; the global batch is reached by gradient accumulation."),
    option("--workers", type=click.IntRange(min=0), default=min(4, os.cpu_count() or 1),
           show_default="4 or the CPU count if fewer", help="Data-loading processes per GPU."),
    option("--allow-other-data", is_flag=True,
           help="Resume this run on another dataset than the one run/data.yaml records (refused otherwise)."),
    option("--compile", "use_compile", is_flag=True, help="torch.compile the model."),
    DEVICE_OPTION,
    QUIET_OPTION,
    option("--dry-run", is_flag=True, help="Print the resolved config and parameter counts, then exit."),
    option("--json", "as_json", is_flag=True, help="With --dry-run: print JSON instead of YAML."),
])


@click.command(cls=SectionedCommand, short_help="Train a diffusion model or the semantic compressor from a preset.")
@with_options(PRESET, INPUTS, OUTPUT, EVALUATOR, PROBE, RUN_OPTIONS)
def train(preset, assignments, data, outdir, dry_run, as_json, vfm_weights, batch_gpu, workers, keep_last, keep_every,
          allow_other_data, use_compile, tensorboard, eval_every, eval_n, eval_ref, eval_failure, feature_chunk,
          wandb_project, inception_weights, probe_every, probe_n, device, quiet, **options) -> None:
    """Train a preset. Every hyperparameter comes from the preset (see `--dry-run`) unless overridden.

    \b
    Examples:
      reglue train --preset sit-b2-reglue --dry-run
      reglue train --preset compressor-dinov2-b --data data.h5 --outdir runs/comp
      reglue train --preset sit-b2-reglue --data data.h5 --outdir runs/b2 --compressor runs/comp/compressor.pt
      torchrun --nproc_per_node 8 -m reglue_cli train --preset sit-xl2-reglue --data data.h5 \\
          --outdir runs/xl --compressor runs/comp/compressor.pt --batch-gpu 32
    The official compressor works too: --compressor compressor.pth --set compressor.norm_stats=stats.pth
    FID while training (in process, on every GPU; `reglue compare runs/b2 --plot fid.png` draws the curve):
      reglue train --preset sit-b2-reglue ... --eval-every 50000 --eval-n 10000
    To resume, run the same command again (a larger --max-steps continues a finished run).
    """
    config = resolve_config(preset, assignments, options)  # a ConfigError is one line and exit 2 (reglue_cli.main)
    if as_json and not dry_run:
        fail("--json only applies to --dry-run")
    if dry_run:
        print_dry_run(config, parameter_counts(config), as_json)
        return
    if not data or not outdir:
        fail("--data and --outdir are required to train (or pass --dry-run)")
    if (eval_every or wandb_project or probe_every) and config.kind != "diffusion":
        fail("--eval-every, --probe-every and --wandb are for diffusion runs; a compressor run has no samples to "
             "score")
    # every evaluation and W&B setting is checked before the run directory is touched (one line, exit 2)
    callbacks = ((_evaluator(config, eval_every, eval_n, eval_ref, inception_weights, feature_chunk, eval_failure),)
                 if eval_every else ())
    callbacks += (TrainingProbe(probe_every, ProbeSettings(n=probe_n, **neighbours(probe_n))),) if probe_every else ()
    if wandb_project:
        _check_wandb(wandb_project, outdir)
    run_options = TrainOptions(data=data, outdir=outdir, batch_gpu=batch_gpu, workers=workers, compile=use_compile,
                               keep_last=keep_last, keep_every=keep_every, vfm_weights=vfm_weights,
                               tensorboard=tensorboard,
                               progress=not quiet, device=device, allow_other_data=allow_other_data,
                               callbacks=callbacks, wandb_project=wandb_project)
    run = train_compressor if config.kind == "compressor" else train_diffusion
    try:
        trainer = run(config, run_options)
    except TrainingStopped as exc:
        raise click.ClickException(str(exc)) from None  # exit 1: the run failed, the input was fine
    finally:
        shutdown()
    if trainer.dist.is_main:
        click.echo(f"done: step {trainer.step} in {outdir} (run the same command with a larger --max-steps to go on)")
