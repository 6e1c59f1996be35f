"""`reglue sample` as a library call: checkpoint -> guided SDE/ODE -> VAE decoder -> samples.h5 + samples.npz.

Same pixels on any machine count and batch size, by construction: samples are cut into fixed chunks of
``SampleSettings.chunk`` consecutive indices (the last one shorter), and every model and decoder call sees
exactly one chunk (doubled with the null class where guidance acts). A chunk's inputs depend only on
(settings, chunk index), never on ``--batch-size`` or the number of processes, so a kernel that chooses its
algorithm by batch size (oneDNN, cuDNN, cuBLAS) sees the same shapes and values everywhere; cuDNN's autotuner
is switched off while sampling, and a CPU samples on one thread (the thread count changes oneDNN's sums).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from evaluation.determinism import deterministic_kernels, float32_matmuls
from evaluation.environment import environment
from evaluation.extract import chunk_ranges
from reglue.checkpoints import load_model
from reglue.config.sections import SamplingConfig
from reglue.constants import SAMPLE_QUANTISATION, VAE_DOWNSAMPLE
from reglue.distributed import DistInfo, barrier, from_main, main_phase, patient_barrier
from reglue.encoders.registry import TINY_VFM
from reglue.encoders.vae import decode_latents, is_stand_in, load_vae
from reglue.locks import directory_lock
from reglue.sampling.seeds import MAX_SAMPLES, MAX_SEED, SampleError, SampleNoise, make_labels, sample_seed
from reglue.sampling.store import SampleStoreError, check_out_dir, done_indices, merge, open_part
from reglue.transport.path import Path as InterpolantPath
from reglue.transport.path import get_path
from reglue.transport.samplers import (
    ADAPTIVE,
    SAMPLERS,
    Guidance,
    function_evaluations,
    guided_velocity,
    sample_dopri5,
    sample_ode,
    sample_sde,
    time_grid,
)

DEFAULT_CHUNK = 32  # samples per model and decoder call (the reference's per-GPU batch in generate.py)


@dataclass(frozen=True)
class SampleSettings:
    """Everything that decides which images come out (not how fast)."""

    n: int
    sampler: str = "sde"
    steps: int = 250
    guidance: Guidance = field(default_factory=Guidance)
    seed: int = 0
    balanced: bool = False
    classes: tuple[int, ...] | None = None
    weights: str = "ema"
    vae: str | None = None  # default: the config's data.vae_decoder (sd-vae-ft-ema)
    chunk: int = DEFAULT_CHUNK  # samples per model/decoder call: part of what decides the pixels (see above)
    tf32: bool = False  # TF32 matmuls on a GPU: faster, other last bits than the strict fp32 default
    time_shift: float = 1.0  # the time grid's shift (transport.samplers.shift_time); 1: the reference's grid
    guide: str | None = None  # autoguidance: the guide checkpoint's path (None: classifier-free guidance)
    guide_weights: str = "ema"  # the guide's EMA or raw weights
    rtol: float = 1e-3  # ode-dopri5's tolerances (SiT's); its steps are capped by ``steps``
    atol: float = 1e-6

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise SampleError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.chunk < 1:
            raise SampleError(f"chunk must be at least 1, got {self.chunk}")
        if not 0 <= self.seed <= MAX_SEED or self.n > MAX_SAMPLES:
            raise SampleError(f"seed {self.seed}, N {self.n:,}: seeds go from 0 to {MAX_SEED}, and one seed gives at "
                              f"most {MAX_SAMPLES:,} samples (reglue.sampling.seeds)")
        if self.guidance.reference_vae_cfg and self.sampler != "sde":
            raise SampleError("--reference-vae-cfg reproduces the reference's SDE sampler; use it with --sampler sde")
        if not (math.isfinite(self.time_shift) and self.time_shift > 0):
            raise SampleError(f"time shift {self.time_shift}: must be a finite number > 0")
        if not (self.rtol > 0 and self.atol > 0 and math.isfinite(self.rtol) and math.isfinite(self.atol)):
            raise SampleError(f"tolerances rtol {self.rtol}, atol {self.atol}: must be finite numbers > 0")
        if self.guide is not None and self.guidance.reference_vae_cfg:
            raise SampleError("--reference-vae-cfg is the reference's classifier-free guidance; not with --guide-ckpt")

    def describe(self) -> dict:
        """Plain-data form for attributes and the run id."""
        data = asdict(self)
        data["guidance"] = {**asdict(self.guidance), "cls_scale": self.guidance.effective_cls_scale}
        if not self.tf32:  # strict fp32, the default: recorded by its absence, so runs made before keep their ids
            del data["tf32"]
        if self.time_shift == 1.0:  # the reference's grid: likewise
            del data["time_shift"]
        if self.guide is None:  # classifier-free guidance: likewise
            del data["guide"], data["guide_weights"]
        if self.sampler not in ADAPTIVE:  # the tolerances only matter to an adaptive sampler
            del data["rtol"], data["atol"]
        return data

    def grid(self) -> torch.Tensor:
        """The time grid these settings integrate on."""
        return time_grid(self.steps, self.time_shift)

    def function_evaluations(self) -> int:
        """Model evaluations per sample (a guided step counts its two passes)."""
        return function_evaluations(self.sampler, self.grid(), self.guidance)


@dataclass(frozen=True)
class SampleRequest:
    """What `reglue sample` was asked for: None (not given) takes the value of the checkpoint's ``sampling``
    section (reglue.config.sections.SamplingConfig), so a preset's paper settings are the default."""

    n: int
    sampler: str | None = None
    steps: int | None = None
    cfg: float | None = None
    cls_cfg: float | None = None  # not given with --cfg given: follows --cfg
    interval: tuple[float, float] | None = None
    channels: str | None = None
    reference_vae_cfg: bool = False
    seed: int = 0
    balanced: bool = False
    classes: tuple[int, ...] | None = None
    weights: str = "ema"
    vae: str | None = None
    chunk: int = DEFAULT_CHUNK
    tf32: bool = False
    time_shift: float | None = None
    guide: str | None = None
    guide_weights: str = "ema"
    rtol: float = 1e-3
    atol: float = 1e-6

    def resolve(self, sampling: SamplingConfig) -> tuple[SampleSettings, list[str]]:
        """(settings, names of the settings taken from ``sampling``)."""
        pick = lambda given, preset: preset if given is None else given  # noqa: E731
        cls_from_checkpoint = self.cls_cfg is None and self.cfg is None  # --cfg alone sets both scales
        cls_cfg = sampling.cfg_cls_scale if cls_from_checkpoint else self.cls_cfg
        taken = [name for name, from_checkpoint in (
            ("sampler", self.sampler is None), ("steps", self.steps is None), ("cfg", self.cfg is None),
            ("cls_cfg", cls_from_checkpoint), ("interval", self.interval is None), ("channels", self.channels is None),
            ("time_shift", self.time_shift is None and sampling.time_shift != 1.0)) if from_checkpoint]
        guidance = Guidance(scale=pick(self.cfg, sampling.cfg_scale), cls_scale=cls_cfg,
                            interval=tuple(pick(self.interval, sampling.guidance_interval)),
                            channels=pick(self.channels, sampling.cfg_channels),
                            reference_vae_cfg=self.reference_vae_cfg)
        settings = SampleSettings(n=self.n, sampler=pick(self.sampler, sampling.sampler),
                                  steps=pick(self.steps, sampling.steps), guidance=guidance, seed=self.seed,
                                  balanced=self.balanced, classes=self.classes, weights=self.weights, vae=self.vae,
                                  chunk=self.chunk, tf32=self.tf32, time_shift=pick(self.time_shift,
                                                                                    sampling.time_shift),
                                  guide=self.guide, guide_weights=self.guide_weights, rtol=self.rtol, atol=self.atol)
        return settings, taken


@dataclass
class SampleSummary:
    """What a run did."""

    out: Path
    n: int
    written: int = 0
    seconds: float = 0.0
    reused: bool = False


def file_sha256(path, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def passes_of(chunks: list[range], batch_size: int, chunk: int) -> list[list[range]]:
    """Group a process's chunks into passes of ceil(batch_size / chunk) whole chunks."""
    per_pass = max(1, -(-batch_size // chunk))
    return [chunks[i : i + per_pass] for i in range(0, len(chunks), per_pass)]


def integrate(model, settings: SampleSettings, seeds: list[int], labels: torch.Tensor, device,
              path: InterpolantPath, guide=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final joint state (x (B, C, H, W), cls (B, D) or None) in float64 of one chunk of samples (``guide``: the
    autoguidance model of ``settings.guide``)."""
    cfg = model.config
    noise = SampleNoise(seeds, (cfg.in_channels, cfg.input_size, cfg.input_size),
                        cfg.cls_dim if cfg.cls_token else None, device)
    x, cls = noise.initial()
    velocity = guided_velocity(model, settings.guidance, guide)
    grid = settings.grid()
    if settings.sampler == "sde":
        return sample_sde(velocity, x, cls, labels.to(device), grid, noise.step, path)
    if settings.sampler == "ode-dopri5":
        return sample_dopri5(velocity, x, cls, labels.to(device), settings.rtol, settings.atol, settings.steps)[:2]
    return sample_ode(velocity, x, cls, labels.to(device), grid, heun=settings.sampler == "ode-heun")


def sample_chunk(model, vae, settings: SampleSettings, indices: range, labels: torch.Tensor, device,
                 path: InterpolantPath, latent_scale: float, guide=None) -> dict:
    """One chunk, integrated and decoded in single calls, in the float32 precision its settings name (strict fp32
    unless ``tf32``, whatever the process set): the rows a part file receives."""
    batch = list(indices)
    seeds = [sample_seed(settings.seed, i) for i in batch]
    with float32_matmuls(settings.tf32):
        x, _ = integrate(model, settings, seeds, labels[batch], device, path, guide)
        images = decode_latents(vae, x[:, : model.config.latent_channels].float(), latent_scale).numpy()
    return {"index": np.array(batch), "images": images, "labels": labels[batch].numpy(), "seeds": np.array(seeds)}


def _concat(rows: list[dict]) -> dict:
    return {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}


def sample_to_dir(ckpt, out, settings: SampleSettings | SampleRequest, batch_size: int = 32,
                  dist: DistInfo = DistInfo(), overwrite: bool = False, progress: bool = True,
                  log: Callable[[str], None] = tqdm.write) -> SampleSummary:
    """Write ``settings.n`` samples of ``ckpt`` to ``out``; run again to resume, any process count gives the same.

    ``settings``: everything spelled out, or a SampleRequest whose missing values come from the checkpoint's
    ``sampling`` section; the settings used are recorded in samples.h5 (attribute ``settings``).

    ``batch_size``: samples per pass on each process, rounded up to whole chunks; it decides how often finished
    samples are saved, never the pixels (settings.chunk does, see the module docstring). One process (rank 0)
    holds ``out``'s lock meanwhile: a second sampling run into it is refused.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SampleStoreError(f"{out}: exists and is not a directory")
    lock = directory_lock(out).acquire() if dist.is_main else None
    try:
        return _sample(ckpt, out, settings, batch_size, dist, overwrite, progress, log)
    finally:
        if lock is not None:
            lock.release()


def check_settings(settings: SampleSettings, num_classes: int) -> None:
    """SampleError when the settings ask for labels or guidance the model does not have (an unconditional model is
    guided by a guide model only)."""
    if num_classes == 0:
        g = settings.guidance
        if (g.scale != 1.0 or g.effective_cls_scale != 1.0) and settings.guide is None:
            raise SampleError(f"guidance scale {g.scale} / [CLS] {g.effective_cls_scale}: an unconditional model has "
                              "no classifier-free guidance; use --cfg 1")
        if settings.classes or settings.balanced:
            raise SampleError("--class and --balanced need a class-conditional model; this one is unconditional")
    for c in settings.classes or ():
        if not 0 <= c < num_classes:
            raise SampleError(f"class {c} out of range 0..{num_classes - 1}")


@dataclass
class Prepared:
    """A checkpoint made ready to sample: the model on its device, the resolved settings and the provenance."""

    model: torch.nn.Module
    config: object  # the checkpoint's DiffusionRun
    settings: SampleSettings
    taken: list[str]  # settings taken from the checkpoint's sampling section
    path: InterpolantPath
    vae_id: str
    attrs: dict  # what samples.h5 records
    guide: torch.nn.Module | None = None  # the autoguidance model (settings.guide), on the model's device


def guide_path(guide: str, ckpt) -> Path:
    """--guide-ckpt as a file: a path, or a step of the checkpoint's own run directory (RUN/checkpoints/NNNNNNN.pt)."""
    if guide.isdigit() and ckpt is not None:
        return Path(ckpt).parent / f"{int(guide):07d}.pt"
    return Path(guide)


def load_guide(settings: SampleSettings, model, device) -> torch.nn.Module:
    """The guide model of ``settings``, checked against ``model``: the same channels, [CLS] token, classes and
    resolution (its depth and width may differ); SampleError naming the difference otherwise."""
    guide, _ = load_model(settings.guide, ema=settings.guide_weights == "ema")
    a, b = model.config, guide.config
    for name in ("in_channels", "cls_token", "num_classes", "input_size"):
        if getattr(a, name) != getattr(b, name):
            raise SampleError(f"--guide-ckpt {settings.guide}: its {name} is {getattr(b, name)}, the model's "
                              f"{getattr(a, name)}; a guide must denoise the same state")
    if a.cls_token and a.cls_dim != b.cls_dim:
        raise SampleError(f"--guide-ckpt {settings.guide}: its [CLS] width is {b.cls_dim}, the model's {a.cls_dim}")
    return guide.to(device).eval()


def prepare(ckpt, settings: SampleSettings | SampleRequest, device, model=None, config=None) -> Prepared:
    """Load ``ckpt`` (or take an in-memory ``model`` and its run ``config``; ``ckpt`` then only names it), resolve
    and check the settings."""
    in_memory = model is not None
    if not in_memory:
        model, config = load_model(ckpt, ema=settings.weights == "ema")
    taken: list[str] = []
    if isinstance(settings, SampleRequest):
        settings, taken = settings.resolve(config.sampling)
    model = model.to(device).eval()
    cfg = model.config
    if settings.guide is not None:
        settings = replace(settings, guide=str(guide_path(settings.guide, ckpt)))
    check_settings(settings, cfg.num_classes)
    guide = load_guide(settings, model, device) if settings.guide is not None else None
    path = get_path(config.transport.path)
    vae_id = settings.vae or config.data.vae_decoder
    sha = file_sha256(ckpt) if ckpt is not None and Path(ckpt).is_file() else ""  # "": an in-memory model
    with float32_matmuls(settings.tf32):  # the switches in force while these samples are made
        env = environment(device)
    attrs = {"checkpoint": str(ckpt), "checkpoint_sha256": sha, "preset": config.preset,
             "step": int((config.origin or {}).get("step", 0)), "decoder": vae_id, "path": path.name,
             "num_classes": cfg.num_classes, "null_class": -1 if model.null_class is None else model.null_class,
             "quantisation": SAMPLE_QUANTISATION,
             "latent_scale": config.data.latent_scale, "settings": json.dumps(settings.describe()),
             "settings_from_checkpoint": json.dumps(taken), "environment": json.dumps(env),
             "stand_ins": json.dumps(stand_ins(config, vae_id)),
             "ema": json.dumps(ema_of(config, settings.weights, in_memory)),
             **({"nfe": settings.function_evaluations()} if settings.sampler not in ADAPTIVE else {}),
             **({"guide_sha256": file_sha256(settings.guide)} if guide is not None else {})}
    return Prepared(model, config, settings, taken, path, vae_id, attrs, guide)


def ema_of(config, weights: str, in_memory: bool) -> dict:
    """Which average of the weights the samples come from: the loader's record (reglue.checkpoints.model.ema_used),
    or for in-memory weights (training's evaluation) the run's classic EMA or its raw model."""
    recorded = (config.origin or {}).get("ema")
    if recorded is not None:
        return recorded
    if in_memory and weights == "ema":
        return {"kind": "classic", "decay": config.ema.decay}
    return {"kind": "none" if weights == "model" else "unknown"}


def stand_ins(config, decoder: str) -> list[str]:
    """Which parts behind these samples are stand-ins (their numbers are not comparable to papers): the decoder,
    the VAE the training data was encoded with, the VFM the model was trained against."""
    return [part for part, standing_in in (("decoder", is_stand_in(decoder)), ("vae", is_stand_in(config.data.vae)),
                                           ("vfm", config.model.uses_vfm and config.vfm.name == TINY_VFM))
            if standing_in]


def log_taken(prepared: Prepared, log: Callable[[str], None]) -> None:
    """Say which settings came from the checkpoint's sampling section."""
    if prepared.taken:
        log("from the checkpoint's sampling section: " + ", ".join(
            f"{k} {v}" for k, v in _shown(prepared.settings).items() if k in prepared.taken))


def _sample(ckpt, out: Path, settings: SampleSettings | SampleRequest, batch_size: int, dist: DistInfo,
            overwrite: bool, progress: bool, log: Callable[[str], None]) -> SampleSummary:
    """sample_to_dir's work, under the lock."""
    started = time.time()
    prepared = prepare(ckpt, settings, dist.device)
    model, config, settings, path, vae_id, attrs = (prepared.model, prepared.config, prepared.settings, prepared.path,
                                                   prepared.vae_id, prepared.attrs)
    cfg = model.config
    if dist.is_main:
        log_taken(prepared, log)
    guide = [attrs["guide_sha256"]] if "guide_sha256" in attrs else []  # unguided runs keep their ids
    run_id = hashlib.sha256(json.dumps([attrs["checkpoint_sha256"], vae_id, settings.describe(), *guide]).encode()
                            ).hexdigest()
    if from_main(lambda: check_out_dir(out, run_id, overwrite), dist):  # rank 0 alone deletes (--overwrite)
        return SampleSummary(out, settings.n, settings.n, time.time() - started, reused=True)
    out.mkdir(parents=True, exist_ok=True)
    labels = make_labels(settings.n, cfg.num_classes, settings.seed, settings.balanced, list(settings.classes or []))
    done = done_indices(out, run_id)
    barrier()
    mine = chunk_ranges(settings.n, settings.chunk)[dist.rank :: dist.world]
    todo = [c for c in mine if not done.issuperset(c)]
    if done and dist.is_main:
        log(f"resuming: {len(done)} of {settings.n} samples already written")
    vae = load_vae(vae_id)[0].to(dist.device)
    resolution = cfg.input_size * VAE_DOWNSAMPLE
    part = open_part(out, dist.rank, dist.world, run_id, resolution)
    bar = tqdm(total=settings.n, initial=len(done), unit="img", desc="sample", dynamic_ncols=True,
               disable=not (progress and dist.is_main))
    try:
        with deterministic_kernels(torch.device(dist.device)):
            for chunks in passes_of(todo, batch_size, settings.chunk):
                part.append(_concat([sample_chunk(model, vae, settings, c, labels, dist.device, path,
                                                  config.data.latent_scale, prepared.guide) for c in chunks]))
                bar.update(sum(map(len, chunks)) * dist.world)
    finally:
        part.close()
        bar.close()
    patient_barrier()  # the ranks' shares may finish far apart
    with main_phase("sample-merge"):  # minutes at 512 px: the others wait through gloo
        if dist.is_main:
            merge(out, settings.n, resolution, run_id, attrs)
    return SampleSummary(out, settings.n, sum(map(len, todo)), time.time() - started)


def _shown(settings: SampleSettings) -> dict:
    """The settings a SampleRequest may leave to the checkpoint, by their flag names."""
    g = settings.guidance
    return {"sampler": settings.sampler, "steps": settings.steps, "cfg": g.scale, "cls_cfg": g.effective_cls_scale,
            "interval": ",".join(f"{v:g}" for v in g.interval), "channels": g.channels,
            "time_shift": settings.time_shift}
