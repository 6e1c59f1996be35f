"""The sampler flags that `reglue sample`, `reglue eval --ckpt` and `reglue sweep` share, and their checks."""

from __future__ import annotations

import math

import click

from reglue.sampling.run import DEFAULT_CHUNK, SampleRequest
from reglue.sampling.seeds import MAX_SEED
from reglue.transport.samplers import SAMPLERS
from reglue_cli.errors import fail
from reglue_cli.help_sections import OptionGroup, option


def parse_interval(text: str) -> tuple[float, float]:
    """'LOW,HIGH' -> (low, high) within [0, 1]."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"--interval {text!r}: expected LOW,HIGH, e.g. 0,0.9")
    if not 0.0 <= low <= high <= 1.0:
        fail(f"--interval {text}: needs 0 <= LOW <= HIGH <= 1 (t = 1 is noise)")
    return low, high


# Named groups of options, used by `reglue sample`, `reglue eval --ckpt` and `reglue sweep` in the order they list
# them (never sliced by position: a new option joins its group by name). Each group's title is the --help section
# that lists its options (groups of one title share a section).
GUIDANCE = "Guidance"
SAMPLING = "Sampler"

GUIDANCE_SCALES = OptionGroup(GUIDANCE, [
    option("--cfg", type=click.FloatRange(min=0), default=None,
           help="Classifier-free guidance scale: d_u + S (d_c - d_u); 1: none, 0: the unconditional model "
                "[default: the checkpoint's sampling.cfg_scale: 1, or 2.8 for sit-xl2-reglue]."),
    option("--cls-cfg", type=click.FloatRange(min=0), default=None,
           help="[CLS] guidance scale [default: --cfg when given, else the checkpoint's "
                "sampling.cfg_cls_scale]. The official generate.py differs: see docs/sample.md."),
    option("--interval", default=None, metavar="LOW,HIGH",
           help="Guidance acts only for t in [LOW, HIGH] (t = 1 is noise); one conditional pass elsewhere "
                "[default: the checkpoint's sampling.guidance_interval, 0,0.9]."),
    option("--guide-ckpt", default=None, metavar="PATH|STEP",
           help="Autoguidance (Karras et al. 2024): a weaker model guides instead of the null class, v_g + S (v - "
                "v_g) with S = --cfg, on the same labels and interval; a checkpoint file, or a step of CKPT's run "
                "directory (e.g. 20000). It may be smaller; channels, classes and resolution must agree."),
    option("--guide-weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
           help="The guide's EMA or raw model weights."),
])

SAMPLER = OptionGroup(SAMPLING, [
    option("--sampler", type=click.Choice(SAMPLERS), default=None,
           help="Euler-Maruyama SDE (the reference), or the Euler / Heun ODE on the same time grid "
                "[default: the checkpoint's sampling.sampler, sde for every preset]."),
    option("--steps", type=click.IntRange(min=1), default=None,
           help="Integration steps [default: the checkpoint's sampling.steps, 250 for the paper presets]."),
    option("--rtol", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
           help="--sampler ode-dopri5: relative tolerance (its steps adapt; --steps caps them)."),
    option("--atol", type=click.FloatRange(min=0, min_open=True), default=1e-6, show_default=True,
           help="--sampler ode-dopri5: absolute tolerance."),
    option("--time-shift", type=click.FloatRange(min=0, min_open=True), default=None, metavar="S",
           help="Shift the time grid, s t / (1 + (s - 1) t): s > 1 spends more steps near noise (SD3, RAE) "
                "[default: the checkpoint's sampling.time_shift, 1: the reference's grid]."),
])

GUIDANCE_CHANNELS = OptionGroup(GUIDANCE, [
    option("--cfg-channels", type=click.Choice(["all", "latents"]), default=None,
           help="Guide every channel (REGLUE) or only the 4 VAE channels [default: the checkpoint's, all]."),
    option("--reference-vae-cfg", is_flag=True,
           help="With --cfg-channels latents and --sampler sde: the official --vae_cfg true, d_c + S (d_c - "
                "d_u) on the latents (scale S + 1), standard CFG on every channel at the last step."),
])

DRAWS = OptionGroup(SAMPLING, [
    option("--seed", type=click.IntRange(min=0, max=MAX_SEED), default=0, show_default=True,
           help="Global seed; sample i's noise and label depend only on (seed, i)."),
    option("--chunk", type=click.IntRange(min=1), default=DEFAULT_CHUNK, show_default=True,
           help="Samples per model and decoder call (2x rows while guided). Part of the settings, like "
                "--seed: a kernel may pick its algorithm by batch size, so a different chunk may move the "
                "last bits."),
])

SELECTION = OptionGroup(SAMPLING, [
    option("--balanced", is_flag=True, help="Exactly N/K samples of each class, in a seeded random order."),
    option("--class", "classes", type=click.IntRange(min=0), multiple=True,
           help="Only these class ids (repeatable)."),
    option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
           help="The checkpoint's EMA weights (the papers' samples) or its trained model weights."),
    option("--tf32", is_flag=True,
           help="Sample with TF32 matmuls and convolutions on the GPU: faster on A100/H100, but other last bits "
                "than the default strict fp32 (which the training evaluator and grids also use); recorded in "
                "the settings, so such samples never pass for strict ones."),
    option("--vae", default=None, metavar="ID|PATH|tiny",
           help="VAE decoder [default: the checkpoint's config: stabilityai/sd-vae-ft-ema, or its local copy "
                "$REGLUE_VAE_DECODER]."),
])


def check_scale(flag: str, value: float | None) -> None:
    """Exit 2 unless a guidance scale is finite."""
    if value is not None and not math.isfinite(value):
        fail(f"{flag} {value}: a guidance scale must be a finite number")


def make_request(n: int, sampler=None, steps=None, cfg=None, cls_cfg=None, interval=None, cfg_channels=None,
                 reference_vae_cfg=False, seed=0, chunk=DEFAULT_CHUNK, balanced=False, classes=(), weights="ema",
                 vae=None, tf32=False, time_shift=None, guide_ckpt=None, guide_weights="ema", rtol=1e-3,
                 atol=1e-6) -> SampleRequest:
    """The SampleRequest of the flags above (None: the checkpoint's sampling section decides), checked."""
    check_scale("--cfg", cfg)
    check_scale("--cls-cfg", cls_cfg)
    low_high = parse_interval(interval) if isinstance(interval, str) else interval
    if reference_vae_cfg and cfg_channels != "latents":
        fail("--reference-vae-cfg only applies with --cfg-channels latents")
    if reference_vae_cfg and sampler not in (None, "sde"):
        fail("--reference-vae-cfg reproduces the reference's SDE sampler; use it with --sampler sde")
    if guide_ckpt is not None and reference_vae_cfg:
        fail("--reference-vae-cfg is the reference's classifier-free guidance; it does not go with --guide-ckpt")
    if (rtol, atol) != (1e-3, 1e-6) and sampler != "ode-dopri5":
        fail("--rtol and --atol are the tolerances of --sampler ode-dopri5")
    if guide_ckpt is None and guide_weights != "ema":
        fail("--guide-weights goes with --guide-ckpt")
    return SampleRequest(n=n, sampler=sampler, steps=steps, cfg=cfg, cls_cfg=cls_cfg, interval=low_high,
                         channels=cfg_channels, reference_vae_cfg=reference_vae_cfg, seed=seed, balanced=balanced,
                         classes=tuple(classes) or None, weights=weights, vae=vae, chunk=chunk, tf32=tf32,
                         time_shift=time_shift, guide=guide_ckpt, guide_weights=guide_weights, rtol=rtol, atol=atol)
