"""Consistency of a whole run configuration: the sections must fit each other (one line per problem, at load)."""

from __future__ import annotations

import dataclasses

from reglue.config.sections import CompressorRun, DiffusionRun, LatentData
from reglue.constants import VAE_DOWNSAMPLE
from reglue.encoders.registry import VFMEntry, vfm_entry
from reglue.errors import ConfigError


def _spec(vfm) -> VFMEntry:
    """The known shape of ``vfm.name``; ConfigError listing the known ones otherwise."""
    spec = vfm_entry(vfm.name)
    if vfm.image_size % spec.patch:
        raise ConfigError(f"vfm.image_size {vfm.image_size} is not a multiple of {vfm.name}'s patch {spec.patch}")
    bad = [b for b in vfm.layers if b >= spec.depth]
    if bad:
        raise ConfigError(f"vfm.layers {list(vfm.layers)}: {vfm.name} has blocks 0..{spec.depth - 1}")
    for key in ("cls_layer", "repa_layer"):
        block = getattr(vfm, key, 0)
        if not -spec.depth <= block < spec.depth:
            raise ConfigError(f"vfm.{key} {block}: {vfm.name} has blocks 0..{spec.depth - 1} (-1: the last)")
    return spec


def _unread(run, key: str, why: str) -> None:
    """ConfigError for ``key`` ('section.name') set away from its default in a run where no code would read it."""
    section_name, name = key.split(".")
    section = getattr(run, section_name)
    default = next(f.default for f in dataclasses.fields(section) if f.name == name)
    if getattr(section, name) != default:
        raise ConfigError(f"{key}={getattr(section, name)!r}: {why}, so nothing would read it")


def check_resolution(data: LatentData, model) -> None:
    """data.resolution / 8 must be the model's latent grid."""
    if data.resolution % VAE_DOWNSAMPLE or data.resolution // VAE_DOWNSAMPLE != model.input_size:
        raise ConfigError(f"data.resolution {data.resolution} gives {data.resolution / VAE_DOWNSAMPLE:g}x"
                          f"{data.resolution / VAE_DOWNSAMPLE:g} latents but model.input_size is {model.input_size}")


def _check_semantics(run: DiffusionRun, spec: VFMEntry) -> None:
    """Token grid, widths and compressor channels against the VFM."""
    m, v, c = run.model, run.vfm, run.compressor
    grid = v.image_size // spec.patch
    if m.cls_token and m.cls_dim != spec.width:
        raise ConfigError(f"model.cls_dim {m.cls_dim} differs from {v.name}'s token width {spec.width}")
    if m.projector is not None:
        if m.projector.out_dim != spec.width:
            raise ConfigError(f"model.projector.out_dim {m.projector.out_dim} differs from {v.name}'s token width "
                              f"{spec.width}")
        if m.projector.align_patch and m.num_patches != grid * grid:
            raise ConfigError(f"REPA aligns the model's {m.num_patches} patch tokens to {v.name}'s {grid}x{grid} "
                              f"tokens at vfm.image_size {v.image_size}: set vfm.image_size to "
                              f"{round(m.num_patches ** 0.5) * spec.patch}")
    if m.semantic_channels and m.input_size % grid:
        raise ConfigError(f"the {grid}x{grid} semantic grid of {v.name} at vfm.image_size {v.image_size} does not "
                          f"divide the {m.input_size}x{m.input_size} latent grid")
    width = spec.width * len(v.layers)
    if m.semantic_source == "compressor":
        if c.channels is None:
            raise ConfigError("model.semantic_source is compressor but compressor.channels is null")
        if c.channels[0] != width or c.channels[-1] != m.semantic_channels:
            raise ConfigError(f"compressor.channels {list(c.channels)} must map {len(v.layers)} layers x {spec.width} "
                              f"= {width} VFM channels to model.semantic_channels {m.semantic_channels}")
    if m.semantic_source == "pca" and m.semantic_channels > width:
        raise ConfigError(f"model.semantic_channels {m.semantic_channels}: PCA of {width} VFM channels gives at most "
                          f"{width}")


def _check_unread(run: DiffusionRun) -> None:
    """Keys changed from their defaults that this model would never read."""
    m = run.model
    unread = []
    if not m.semantic_channels:
        unread += [(k, "the model has no semantic channels") for k in ("loss.semantic", "loss.semantic_schedule")]
    if not m.cls_token:
        unread += [(k, "the model has no [CLS] token") for k in ("loss.cls", "vfm.cls_layer")]
    if m.projector is None:
        unread += [(k, "the model has no REPA projector") for k in ("loss.repa", "vfm.repa_layer",
                                                                     "loss.repa_schedule", "loss.repa_ramp")]
    if m.semantic_source != "compressor":
        unread += [(f"compressor.{k}", f"model.semantic_source is {m.semantic_source}, not compressor")
                   for k in ("channels", "path", "norm_stats")]
    if not run.ema.sigma_rels:
        unread += [(f"ema.{k}", "ema.sigma_rels is empty (no power-function EMA is tracked)")
                   for k in ("snapshot_every", "snapshot_precision", "snapshot_keep_every", "snapshot_keep_last")]
    elif not run.ema.snapshot_every:
        raise ConfigError(f"ema.sigma_rels {list(run.ema.sigma_rels)}: tracked but never written; set "
                          "ema.snapshot_every (EDM2 snapshots every ~1-2% of training)")
    for key, why in unread:
        _unread(run, key, why)
    if not m.num_classes:
        s = run.sampling
        if s.cfg_scale != 1.0 or s.cfg_cls_scale not in (None, 1.0):
            raise ConfigError(f"sampling.cfg_scale {s.cfg_scale} / cfg_cls_scale {s.cfg_cls_scale}: an unconditional "
                              "model (model.num_classes 0) has no classifier-free guidance; use 1")


def check_diffusion(run: DiffusionRun, stored: bool = False) -> DiffusionRun:
    """``run`` with the VFM blocks it reads counted from 0 (-1: the last block); ConfigError naming the first pair
    of sections that do not fit. ``stored``: an earlier run's, whose unread keys are not refused."""
    check_resolution(run.data, run.model)
    if not stored:
        _check_unread(run)
    if not run.model.uses_vfm:
        return run
    spec = _spec(run.vfm)
    _check_semantics(run, spec)
    m, v = run.model, run.vfm
    vfm = dataclasses.replace(v, cls_layer=v.cls_layer % spec.depth if m.cls_token else v.cls_layer,
                              repa_layer=v.repa_layer % spec.depth if m.projector else v.repa_layer)
    return dataclasses.replace(run, vfm=vfm)


def unread_sections(run) -> tuple[str, ...]:
    """Sections this run never reads (a plain SiT reads no VFM and no compressor): ignored when resuming."""
    if run.kind != "diffusion":
        return ()
    if not run.model.uses_vfm:
        return ("vfm", "compressor")
    return () if run.model.semantic_source == "compressor" else ("compressor",)


def check_compressor(run: CompressorRun, stored: bool = False) -> CompressorRun:
    """``run``, whose compressor input width must be the VFM's width times its layers."""
    spec = _spec(run.vfm)
    width = spec.width * len(run.vfm.layers)
    if run.compressor.channels[0] != width:
        raise ConfigError(f"compressor.channels starts at {run.compressor.channels[0]} but {len(run.vfm.layers)} "
                          f"layers of {run.vfm.name} give {width} channels")
    return run
