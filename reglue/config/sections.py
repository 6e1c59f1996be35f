"""The run configuration: one frozen dataclass per section, under a root whose ``kind`` decides the sections.

The schema is the code: every key a preset may hold is a field below, with its default (the paper's value, see
docs/method.md) and one line saying what it does. docs/presets.md lists them (a test keeps the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from reglue.config.model import ModelConfig
from reglue.config.schema import (
    BETAS,
    FRACTION,
    INTERVAL,
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_IMAGES,
    MAX_PIXELS,
    MAX_RUN_SEED,
    MAX_SAMPLING_STEPS,
    MAX_STEPS,
    MAX_WIDTH,
    NON_NEGATIVE,
    POSITIVE,
    SCHEDULE,
    count,
    knob,
    optional,
    parse,
)
from reglue.constants import CFG_CHANNELS, LATENT_SCALE
from reglue.ema.profiles import SIGMA_REL_MAX

Precision = Literal["fp32", "bf16", "fp16"]
BATCH = count(MAX_BATCH)
STEPS = count(MAX_STEPS)
SIGMA_RELS = (lambda v: len(set(v)) == len(v) and all(0 < s < SIGMA_REL_MAX for s in v),
              f"a list of distinct relative widths in (0, {SIGMA_REL_MAX:.4f})")
CHANNELS = (lambda v: len(v) >= 2 and all(1 <= c <= MAX_WIDTH for c in v),
            f"a list of at least two channel counts in 1..{MAX_WIDTH}")


# ----------------------------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class LossWeights:
    """Named weights of the joint loss (the ``loss`` section of a run configuration; docs/method.md 5)."""

    latent: float = knob(1.0, "weight of the latent-channel MSE", NON_NEGATIVE)
    semantic: float = knob(1.0, "lam: weight of the semantic-channel MSE", NON_NEGATIVE)
    cls: float = knob(0.03, "weight of the [CLS] MSE (the official --cls 0.03)", NON_NEGATIVE)
    repa: float = knob(0.5, "weight of the REPA term (the official --proj-coeff 0.5)", NON_NEGATIVE)
    semantic_schedule: tuple[tuple[int, float], ...] = knob(
        (), "[[step, lam], ...]: lam takes each value from that optimiser step on", SCHEDULE)
    repa_schedule: tuple[tuple[int, float], ...] = knob(
        (), "[[step, weight], ...]: the REPA weight takes each value from that optimiser step on (HASTE: [[N, 0]] "
            "ends alignment at step N; 0 skips the VFM pass when nothing else needs it)", SCHEDULE)
    repa_ramp: bool = knob(False, "join the repa_schedule points by straight lines (loss.repa before the first, "
                                  "the last value after the last)")

    def __post_init__(self):
        object.__setattr__(self, "semantic_schedule", tuple(sorted(self.semantic_schedule)))
        object.__setattr__(self, "repa_schedule", tuple(sorted(self.repa_schedule)))

    @classmethod
    def from_dict(cls, data: dict) -> "LossWeights":
        """Build from a preset's ``loss`` section."""
        return parse(cls, data, "loss")

    def semantic_at(self, step: int) -> float:
        """lam in force at optimiser step ``step`` (the last schedule entry whose step <= step)."""
        return scheduled(self.semantic, self.semantic_schedule, step)

    def repa_at(self, step: int) -> float:
        """The REPA weight in force at optimiser step ``step`` (steps count from 0 here: the step being taken)."""
        return scheduled(self.repa, self.repa_schedule, step, self.repa_ramp)


def scheduled(base: float, points: tuple[tuple[int, float], ...], step: int, ramp: bool = False) -> float:
    """A weight over optimiser steps: ``base`` before the first (step, value) point; from each point on its value,
    or with ``ramp`` the straight line to the next point's value; the last value after the last point."""
    value = base
    for k, (start, target) in enumerate(points):
        if step < start:
            if ramp and k > 0:
                (s0, v0) = points[k - 1]
                return v0 + (target - v0) * (step - s0) / (start - s0)
            return value
        value = target
    return value


@dataclass(frozen=True)
class ImageData:
    """The images a run reads (``reglue encode`` decides them; training checks the dataset agrees)."""

    resolution: int = knob(256, f"image side in pixels after the ADM centre crop (1..{MAX_PIXELS})",
                           count(MAX_PIXELS))


@dataclass(frozen=True)
class LatentData(ImageData):
    """Images and their SD-VAE latents (docs/method.md 1)."""

    latent_scale: float = knob(LATENT_SCALE, "z = latent_scale * (mean + std * eps) in training; z / latent_scale "
                                             "before decoding a sample", POSITIVE)
    vae: str = knob("stabilityai/sd-vae-ft-mse", "the VAE that encoded the dataset (training refuses a dataset "
                                                 "encoded by another)")
    vae_decoder: str = knob("stabilityai/sd-vae-ft-ema", "the VAE decoder of samples (`reglue sample --vae` "
                                                         "overrides)")
    flip: bool = knob(False, "read the horizontally flipped image and moments with probability 1/2 per sample "
                             "(the dataset needs `reglue encode --flip`)")


# ------------------------------------------------------------------------------------------------------ VFM

@dataclass(frozen=True)
class VFMConfig:
    """The frozen vision foundation model and the blocks whose normed patch tokens form the local semantics."""

    name: str = knob("dinov2-vitb14-reg", "an entry of the VFM registry (docs/models.md); default DINOv2-B/14 with "
                                          "4 registers")
    image_size: int = knob(224, "VFM input side: bicubic resize, no antialias (224 / 14 -> 16x16 tokens; "
                                     f"1..{MAX_PIXELS})", count(MAX_PIXELS))
    layers: tuple[int, ...] = knob((11,), "blocks (counted from 0) whose normed patch maps are concatenated on "
                                          "channels", (lambda v: len(v) > 0 and min(v) >= 0,
                                                       "a non-empty list of block indices >= 0"))


@dataclass(frozen=True)
class DiffusionVFMConfig(VFMConfig):
    """The VFM of a diffusion run: also the blocks of its [CLS] and REPA targets."""

    cls_layer: int = knob(-1, "block (counted from 0; -1: the last) whose normed [CLS] is the global token")
    repa_layer: int = knob(-1, "block (counted from 0; -1: the last) whose normed [CLS] + patch tokens are the "
                               "REPA target")


# ------------------------------------------------------------------------------------------------ compressor

@dataclass(frozen=True)
class FrozenCompressor:
    """The frozen semantic compressor a REGLUE run encodes VFM features with (docs/method.md 3)."""

    channels: tuple[int, ...] | None = knob(None, "its channel list, input first: VFM width x len(vfm.layers) -> "
                                                  f"model.semantic_channels (each 1..{MAX_WIDTH})",
                                            optional(CHANNELS))
    path: str | None = knob(None, "the compressor: a compressor run's directory, one of its checkpoints, its "
                                  "compressor.pt, or the official file (`reglue train --compressor`)")
    norm_stats: str | None = knob(None, "per-channel mean/std file for the official compressor (ours carries them)")


@dataclass(frozen=True)
class CompressorTraining:
    """The compressor autoencoder a compressor run trains (docs/method.md 3)."""

    channels: tuple[int, ...] = knob((3072, 256, 16), "channel list, input first (VFM width x len(vfm.layers); "
                                                      f"each 1..{MAX_WIDTH})", CHANNELS)
    norm_stats_samples: int = knob(50000, "images (a seeded shuffle) for the per-channel mean/std "
                                           f"(1..{MAX_IMAGES:,})", count(MAX_IMAGES))


# ------------------------------------------------------------------------------------------------ transport

@dataclass(frozen=True)
class TransportConfig:
    """The interpolant and the training times (docs/method.md 5); the model predicts the velocity v = eps - x0."""

    path: Literal["linear", "cosine"] = knob("linear", "x_t = (1 - t) x0 + t eps (linear) or the cosine path; "
                                                       "t = 1 is noise")
    time_sampler: Literal["uniform", "lognormal"] = knob("uniform", "training times: uniform on [0, 1] or EDM's "
                                                                    "lognormal")


# -------------------------------------------------------------------------------------------------- optimiser

@dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings common to both kinds of run."""

    name: Literal["adamw", "adam"] = knob("adamw", "optimiser")
    lr: float = knob(1e-4, "learning rate", POSITIVE)
    betas: tuple[float, float] = knob((0.9, 0.999), "Adam betas", BETAS)
    weight_decay: float = knob(0.0, "weight decay", NON_NEGATIVE)
    eps: float = knob(1e-8, "Adam epsilon", POSITIVE)
    grad_clip: float | None = knob(1.0, "clip the gradient norm to this (null: no clipping)", optional(POSITIVE))


@dataclass(frozen=True)
class EMAConfig:
    """The diffusion model's EMAs: the classic decay (the weights `sample` uses) and, beside it, power-function
    profiles whose snapshots let `reglue ema` choose the EMA length after training (EDM2; docs/ema.md)."""

    decay: float = knob(0.9999, "classic EMA decay, every step, from a copy of the initial weights (the checkpoint's "
                                "`ema` weights)", FRACTION)
    sigma_rels: tuple[float, ...] = knob((), "power-function EMAs tracked beside it, by relative std (EDM2: [0.05, "
                                             "0.10]); their snapshots feed `reglue ema`", SIGMA_RELS)
    snapshot_every: int = knob(0, "write the power-function EMAs to ema/NNNNNNN.pt every N steps and at the end "
                                  "(0: never)", count(MAX_STEPS, 0))
    snapshot_precision: Literal["fp16", "fp32"] = knob("fp16", "the snapshots' float precision (fp16: half the disk, "
                                                               "~1e-3 relative rounding per weight)")
    snapshot_keep_every: int | None = knob(None, "once a snapshot is not among the newest snapshot_keep_last, keep "
                                                 "it only at multiples of N steps (null: keep every snapshot)",
                                           optional(STEPS))
    snapshot_keep_last: int = knob(4, "the newest snapshots always kept (with snapshot_keep_every)", STEPS)


@dataclass(frozen=True)
class CompressorOptim(OptimConfig):
    """The compressor's optimiser and its per-epoch schedule (the official train_compressor.py)."""

    name: Literal["adamw", "adam"] = knob("adam", "optimiser")
    lr: float = knob(1e-3, "learning rate", POSITIVE)
    grad_clip: float | None = knob(None, "clip the gradient norm to this (null: no clipping, as the reference)",
                                   optional(POSITIVE))
    schedule: Literal["cosine", "constant"] = knob("cosine", "learning rate per epoch: cosine from lr to eta_min "
                                                             "over t_max_epochs, or constant")
    t_max_epochs: float = knob(100.0, "cosine half-period in epochs", POSITIVE)
    eta_min: float = knob(1e-4, "cosine floor", NON_NEGATIVE)


# ------------------------------------------------------------------------------------------------------ train

@dataclass(frozen=True)
class TrainConfig:
    """How long and how often, common to both kinds of run."""

    global_batch: int = knob(256, f"images per optimiser step over all processes (1..{MAX_BATCH})", BATCH)
    precision: Precision = knob("bf16", "autocast precision (fp16 adds a loss scaler)")
    seed: int = knob(0, f"seed of every random draw of the run (0..{MAX_RUN_SEED})", count(MAX_RUN_SEED, 0))
    ckpt_every: int = knob(10000, "save a checkpoint every N steps (and at the end)", STEPS)
    log_every: int = knob(100, "log the loss terms every N steps", STEPS)


@dataclass(frozen=True)
class DiffusionTrain(TrainConfig):
    """The diffusion run's length and cadence (docs/method.md 5)."""

    max_steps: int = knob(400000, "optimiser steps (400k = 80 ImageNet epochs at batch 256; at most "
                                       f"{MAX_STEPS:,})", STEPS)
    tf32: bool = knob(True, "TF32 matmuls and convolutions on CUDA")
    sample_every: int = knob(10000, "save a grid of EMA samples every N steps (0: never)",
                             count(MAX_STEPS, 0))


@dataclass(frozen=True)
class CompressorTrain(TrainConfig):
    """The compressor run's length and cadence (docs/method.md 3)."""

    global_batch: int = knob(4096, f"images per optimiser step over all processes (1..{MAX_BATCH})", BATCH)
    precision: Precision = knob("fp32", "autocast precision of the VFM and compressor passes")
    ckpt_every: int = knob(1000, "save a checkpoint every N steps (and at the end)", STEPS)
    log_every: int = knob(50, "log the loss every N steps", STEPS)
    epochs: int = knob(25, f"passes over the dataset (1..{MAX_EPOCHS})", count(MAX_EPOCHS))
    max_steps: int | None = knob(None, "optimiser steps; null: epochs x steps per epoch", optional(STEPS))


# --------------------------------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class SamplingConfig:
    """What `reglue sample` (and the training grids) use for this run's checkpoints when a flag is not given."""

    sampler: Literal["sde", "ode-euler", "ode-heun"] = knob("sde", "Euler-Maruyama SDE (the reference) or an ODE")
    steps: int = knob(250, "integration steps on linspace(1 -> 0.04), then one deterministic step to 0 "
                                f"(1..{MAX_SAMPLING_STEPS})", count(MAX_SAMPLING_STEPS))
    cfg_scale: float = knob(1.0, "classifier-free guidance scale (1: none)", NON_NEGATIVE)
    cfg_cls_scale: float | None = knob(None, "[CLS] guidance scale (null: cfg_scale)", optional(NON_NEGATIVE))
    guidance_interval: tuple[float, float] = knob((0.0, 0.9), "guidance acts for t in [low, high] (t = 1 is "
                                                              "noise)", INTERVAL)
    cfg_channels: Literal["all", "latents"] = knob(CFG_CHANNELS, "guide every channel (REGLUE) or only the VAE "
                                                                 "latents")
    time_shift: float = knob(1.0, "shift of the time grid, s t / (1 + (s - 1) t) (SD3, RAE; 1: the reference's "
                                  "grid)", POSITIVE)


# ------------------------------------------------------------------------------------------------------ roots

def section(make, doc: str):
    """A field holding a whole section, built by ``make()`` by default."""
    return field(default_factory=make, metadata={"doc": doc})


@dataclass(frozen=True)
class RunHeader:
    """The keys every run has before its sections (a kind narrows ``kind`` to its own name)."""

    kind: str = knob("", "what the run trains")
    preset: str = knob("", "the preset it was resolved from")
    description: str = knob("", "one line for --dry-run")
    sources: dict | None = knob(None, "where each section's values come from (papers, official code)")


@dataclass(frozen=True)
class DiffusionRun(RunHeader):
    """A SiT / REPA / ReDi / REG / REGLUE training run."""

    kind: Literal["diffusion"] = knob("diffusion", "what the run trains")
    data: LatentData = section(LatentData, "images and latents")
    model: ModelConfig = section(ModelConfig, "the SiT")
    vfm: DiffusionVFMConfig = section(DiffusionVFMConfig, "the frozen VFM")
    compressor: FrozenCompressor = section(FrozenCompressor, "the frozen compressor")
    transport: TransportConfig = section(TransportConfig, "interpolant and times")
    loss: LossWeights = section(LossWeights, "weights of the joint loss")
    optim: OptimConfig = section(OptimConfig, "optimiser")
    ema: EMAConfig = section(EMAConfig, "the EMAs of the weights")
    train: DiffusionTrain = section(DiffusionTrain, "length and cadence")
    sampling: SamplingConfig = section(SamplingConfig, "default sampling settings")
    origin: dict | None = knob(None, "set when a checkpoint is loaded: its format, path, step and weights (not a "
                                     "preset key)")


@dataclass(frozen=True)
class CompressorRun(RunHeader):
    """A semantic compressor pretraining run."""

    kind: Literal["compressor"] = knob("compressor", "what the run trains")
    data: ImageData = section(ImageData, "images")
    vfm: VFMConfig = section(lambda: VFMConfig(layers=(8, 9, 10, 11)), "the frozen VFM")
    compressor: CompressorTraining = section(CompressorTraining, "the autoencoder")
    optim: CompressorOptim = section(CompressorOptim, "optimiser and schedule")
    train: CompressorTrain = section(CompressorTrain, "length and cadence")


RunConfig = DiffusionRun | CompressorRun
KINDS = {"diffusion": DiffusionRun, "compressor": CompressorRun}
