"""The SD-VAE: posterior moments for encoding, latent sampling for training, a tiny random stand-in for tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from reglue.constants import LATENT_CHANNELS
from reglue.encoders.loading import ModelLoadError, hub_cache_dir, hub_reachable

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # encoder (identical to ft-ema's encoder)
DEFAULT_DECODER = "stabilityai/sd-vae-ft-ema"  # decoder at sampling time
TINY_VAE = "tiny"  # random-weight stand-in: outputs are not comparable to anything
VAE_ENV = "REGLUE_VAE"  # a local copy (diffusers folder) of DEFAULT_VAE, used in its place
VAE_DECODER_ENV = "REGLUE_VAE_DECODER"  # a local copy of DEFAULT_DECODER, used in its place
LOCAL_COPY_ENV = {DEFAULT_VAE: VAE_ENV, DEFAULT_DECODER: VAE_DECODER_ENV}
TINY_VAE_SEED = 1234
STAND_IN_KEY = "_reglue_stand_in"  # config.json key of a trained stand-in (reglue.encoders.toy); diffusers ignores it


def build_tiny_vae() -> torch.nn.Module:
    """A deterministic random AutoencoderKL with the SD-VAE layout (8x downsampling, 4 latent channels)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_VAE_SEED)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS,
            norm_num_groups=4, mid_block_add_attention=False,
        )
    return vae.eval().requires_grad_(False)


def stand_in_note(folder: Path) -> str | None:
    """What a diffusers VAE folder's config.json says of it as a stand-in (STAND_IN_KEY), or None for a real VAE."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    note = config.get(STAND_IN_KEY) if isinstance(config, dict) else None
    return str(note) if note else None


def is_stand_in(spec: str | None) -> bool:
    """Whether the VAE ``spec`` names is a stand-in: the random 'tiny' one or a folder marked STAND_IN_KEY."""
    return spec == TINY_VAE or (spec is not None and Path(spec).is_dir() and stand_in_note(Path(spec)) is not None)


def _from_pretrained(source: str, **kwargs) -> torch.nn.Module:
    import warnings

    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # keep hub chatter (accelerate hints, deprecations) off the console
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return AutoencoderKL.from_pretrained(source, **kwargs).eval().requires_grad_(False)


def _how_to_fetch(name: str) -> str:
    env = f" or set {LOCAL_COPY_ENV[name]}=DIR" if name in LOCAL_COPY_ENV else ""
    return (f"fetch it on a machine with network (`hf download {name} --local-dir DIR`), copy DIR here and pass "
            f"--vae DIR{env}")


def vae_id(spec: str | None = None) -> str:
    """The id a dataset encoded with the VAE ``spec`` records (and a run's data.vae is checked against): the hub
    id or 'tiny' as given, a local folder by its absolute path (so demo_out/vae and ./demo_out/vae agree)."""
    name = spec or DEFAULT_VAE
    local = os.environ.get(LOCAL_COPY_ENV.get(name, ""), "") or name
    if local != TINY_VAE and local == name and Path(local).exists():
        return str(Path(local).resolve())
    return name


def load_vae(spec: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The VAE named by ``spec`` (hub id, local directory, or 'tiny'; default DEFAULT_VAE) and a description.

    A hub id with a local copy named in its environment variable (LOCAL_COPY_ENV) loads that copy instead, and
    keeps the hub id as its id (what a run's data.vae names).
    """
    name = spec or DEFAULT_VAE
    spec = os.environ.get(LOCAL_COPY_ENV.get(name, ""), "") or name
    if spec == TINY_VAE:
        return build_tiny_vae(), {"id": TINY_VAE, "comparable": False}
    path = Path(spec)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"VAE {spec}: expected a diffusers folder with config.json and the weights")
        info = {"id": vae_id(name), "comparable": stand_in_note(path) is None}
        return _from_pretrained(str(path)), info
    if spec.count("/") != 1:
        raise ModelLoadError(f"unknown VAE {spec!r}: give a hub id like {DEFAULT_VAE}, a local folder, or 'tiny'")
    try:
        return _from_pretrained(spec, local_files_only=True), {"id": spec, "comparable": True}
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise ModelLoadError(
            f"cannot load VAE {spec}: not in the cache ({hub_cache_dir()}) and the hub is unreachable; "
            + _how_to_fetch(spec)
        )
    try:
        return _from_pretrained(spec), {"id": spec, "comparable": True}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load VAE {spec}: {str(exc).splitlines()[0]}; " + _how_to_fetch(spec)) from None


def images_to_vae_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def posterior_moments(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> posterior (mean, std) stacked on channels: (N, 8, H/8, W/8) float32."""
    device = next(vae.parameters()).device
    dist = vae.encode(images_to_vae_input(images).to(device)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


def sample_latents(moments: torch.Tensor, scale: float, generator: torch.Generator | None = None,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
    """z = (mean + std * eps) * scale from moments (N, 8, h, w), drawn fresh each training step (scale: the run's
    data.latent_scale, 0.18215 for SD-VAE)."""
    mean, std = moments.float().chunk(2, dim=1)
    if eps is None:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps.to(mean)) * scale


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, z: torch.Tensor, scale: float) -> torch.Tensor:
    """Latents scaled by ``scale`` (N, 4, h, w) -> uint8 images (N, H, W, 3), quantised as SAMPLE_QUANTISATION says."""
    device = next(vae.parameters()).device
    x = vae.decode(z.to(device).float() / scale).sample
    return ((x + 1) / 2 * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
